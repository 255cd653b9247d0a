"""A local nested model family for demos and benchmarks, built with no downloads.

Corpus: the ``*.py`` source files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``, sorted; ``site-packages``, test suites, ``encodings``,
build-configuration files and files that are not UTF-8 are skipped). Every ``heldout_every``-th file (in
sorted order) is held out for the held-out loss; the rest is shuffled with the seed. NOTE: the corpus
therefore depends on the Python version; a family is deterministic given the seed *and* the interpreter (and
the torch thread count on the CPU).

Built in order, each saved as an ordinary HF checkpoint (safetensors) with the tokenizer beside it:

1. a byte-level BPE tokenizer trained with ``tokenizers`` (saved as a transformers fast tokenizer);
2. targets of several sizes (``LlamaForCausalLM``), trained with the plain LM loss (SoFT with one exit),
   either from scratch or *grown* from a smaller target of the same width (``TargetSpec.grow_from``: copied,
   extra layers appended with zeroed output projections, trained on), which makes the family nested;
3. one sorted draft made as S2D makes it: the first layers of the *smallest* target (the paper cuts the first
   12 of Vicuna-7B's 32 layers), fine-tuned with SoFT over its exits, plus a distillation term toward the
   targets' distributions (see :mod:`s2d_ext.train.soft`) so that one draft agrees with every target.

Layout: ``<cache>/<size>/{tokenizer,<model name>...,manifest.json}`` where ``<cache>`` is ``--cache-dir``,
else ``$S2D_FAMILY_DIR``, else ``~/.cache/s2d_ext/family``. Each folder is written under a temporary name and
renamed into place (atomic) with a ``s2d_family.json`` marker holding its files' SHA-256; ``manifest.json``
(parameter counts, training tokens, held-out losses, timings, ``"complete": true``) is written last. A cache
whose manifest, markers or checksums do not verify is rebuilt (only the broken parts and what depends on
them), never half-loaded.
"""

from s2d_ext.train.family.build import build_family, family_draft_vocab, total_train_tokens
from s2d_ext.train.family.cache import check_family
from s2d_ext.train.family.corpus import stdlib_corpus, train_tokenizer
from s2d_ext.train.family.load import Family, load_family
from s2d_ext.train.family.spec import (
    EOS_TOKEN,
    FAMILY_SIZES,
    MANIFEST,
    PAD_TOKEN,
    DraftSpec,
    FamilySpec,
    TargetSpec,
    family_dir,
    get_spec,
)

__all__ = [
    "EOS_TOKEN",
    "FAMILY_SIZES",
    "MANIFEST",
    "PAD_TOKEN",
    "DraftSpec",
    "Family",
    "FamilySpec",
    "TargetSpec",
    "build_family",
    "check_family",
    "family_dir",
    "family_draft_vocab",
    "get_spec",
    "load_family",
    "stdlib_corpus",
    "total_train_tokens",
    "train_tokenizer",
]
