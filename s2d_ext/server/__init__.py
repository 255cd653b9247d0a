"""The reference server, ``s2d serve``: OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions``
(with SSE streaming) over one :class:`~s2d_ext.engine.Engine`, continuous batching in a thread of its own.

Needs the ``serve`` extra (``pip install s2d_ext[serve]``: FastAPI and uvicorn). :mod:`.async_engine`
runs the engine; :mod:`.protocol` turns OpenAI requests into engine requests; :mod:`.app` is the HTTP
layer.
"""
