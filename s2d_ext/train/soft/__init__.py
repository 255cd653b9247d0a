"""Sorted fine-tuning (SoFT, arXiv 2309.08968 as used by S2D, arXiv 2407.01955).

A sorted model is an ordinary Llama-family causal LM whose prefixes (the first ``e`` layers, for each
exit ``e``) are trained to be language models too: every exit's hidden state goes through the *shared*
final norm and lm_head. SoFT minimises the mean over exits of the next-token cross-entropy:

    loss = sum_e w_e * (ce_weight * CE_e + sum_t lambda_t * T^2 * KL(p_t^T || q_e^T))

where ``w_e = 1 / n_exits`` (the paper's plain mean) unless ``exit_weights`` is given, ``CE_e`` is the
token-mean next-token cross-entropy of exit ``e``, and the optional distillation term pulls every exit
toward one or several *targets'* next-token distributions ``p_t`` (targets must share the vocabulary):
``KL(p || q) = sum_v p_v (log p_v - log q_v)`` with both distributions softened by the temperature ``T``
(``p^T = softmax(target_logits / T)``) and the usual ``T^2`` factor so gradients keep their scale.
``lambda_t`` is the per-target weight. With one exit equal to the model's depth and no targets this is
plain language-model training (the family builder uses it to train the targets too).

This package works on plain HF models (``LlamaForCausalLM`` and relatives, e.g. truncated by
:func:`truncate_model`), independent of :class:`s2d_ext.SortedDraft`; its checkpoints are in the sorted-draft
format (``config.s2d_exits`` / ``config.s2d_thresholds``) and load with ``SortedDraft.from_pretrained``.

One concern per module: ``exits`` (validate, record, truncate, :func:`cut_draft`), ``loss`` (:func:`soft_loss`
on text), ``text_data`` (:func:`load_texts`, :func:`tokenize_blocks`), ``config`` (:class:`SoftConfig`),
``checkpoint`` (atomic saves and resume), ``train_text`` (:func:`train_soft`), ``self_data_loss`` and
``train_self_data`` (:func:`train_soft_self_data`, SoFT on the target's own text from
:mod:`s2d_ext.train.self_data`)."""

from __future__ import annotations

from s2d_ext.train.soft.checkpoint import (
    CONFIG_FILE,
    STATE_FILE,
    prepare_output_dir,
    read_training_record,
    save_checkpoint,
)
from s2d_ext.train.soft.config import SoftConfig, SoftResult
from s2d_ext.train.soft.exits import cut_draft, model_exits, set_exit_config, truncate_model, validate_exits
from s2d_ext.train.soft.loss import SoftLossOutput, exit_logits, soft_loss
from s2d_ext.train.soft.self_data_loss import (
    SelfDataBatch,
    SelfDataLossOutput,
    exit_hidden_states,
    self_data_batch,
    self_data_loss,
    topk_kl,
    vocab_index,
)
from s2d_ext.train.soft.text_data import load_texts, tokenize_blocks
from s2d_ext.train.soft.train_self_data import self_data_epoch_order, self_data_eval, train_soft_self_data
from s2d_ext.train.soft.train_text import heldout_loss, train_soft

__all__ = [
    "CONFIG_FILE",
    "STATE_FILE",
    "SelfDataBatch",
    "SelfDataLossOutput",
    "SoftConfig",
    "SoftLossOutput",
    "SoftResult",
    "cut_draft",
    "exit_hidden_states",
    "exit_logits",
    "heldout_loss",
    "load_texts",
    "model_exits",
    "prepare_output_dir",
    "read_training_record",
    "save_checkpoint",
    "self_data_batch",
    "self_data_epoch_order",
    "self_data_eval",
    "self_data_loss",
    "set_exit_config",
    "soft_loss",
    "tokenize_blocks",
    "topk_kl",
    "train_soft",
    "train_soft_self_data",
    "truncate_model",
    "validate_exits",
    "vocab_index",
]
