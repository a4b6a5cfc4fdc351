"""``edge-fslm serve``: stacks behind an OpenAI-compatible HTTP server on 127.0.0.1.

* :mod:`registry`  the stacks served, resolved at start, loaded on first use, on one pool
* :mod:`scheduler` the bounded queue and the one worker thread (``--parallel`` groups)
* :mod:`wire`      OpenAI's request checks and response bodies; the ``fslm`` trace field
* :mod:`app`       the Starlette routes, auth and limits; ``page.html`` is the page at ``/``
* :mod:`cli`       the command, run by uvicorn

Needs the ``[server]`` extra (starlette, uvicorn); the runtime itself does not.
"""
