"""Adapters that plug s2d_ext drafts into other serving engines (the top layer, beside the CLI).

:mod:`.vllm`: vLLM's ``custom_class`` speculative proposer backed by a sorted draft. Importing this package
imports no engine (neither vLLM nor Ray); each adapter imports only torch and s2d_ext at load time.
"""
