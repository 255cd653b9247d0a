"""Batch APIs over the engine: ``speculate()`` (:mod:`.speculation`), ``Speculator`` (:mod:`.speculator`)
and the ``custom_generate`` hook (:mod:`.hf_hook`). They share :mod:`.batch`.

NOTE: no module here is named ``speculate`` or ``generate``: ``s2d_ext.speculate`` and
``s2d_ext.generate`` are the public functions, and importing a submodule of that name would replace the
package attribute with the module.
"""
