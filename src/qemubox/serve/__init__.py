"""``qemubox serve``: the E2B API over named sandboxes (see README, "Serving the E2B API").

Floors, each importing only those below it: ``model`` (plain data, E2B's shapes),
``keys`` (API keys), ``guests`` (a served sandbox's guest as the server holds it),
``registry`` (the served sandboxes and their lifecycle), ``envd`` and ``files`` (envd over
a guest), ``control`` (the control plane), ``app`` (the one ASGI application), ``server``
(templates, adoption, uvicorn)."""
