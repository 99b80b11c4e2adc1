"""The servers flashstep is measured against, each a small real program on the same checkpoint.

fastapi_per_request.py: the common pattern, a FastAPI app calling a diffusers pipeline per request.
litserve_peer.py:       LitServe with its own batching (max_batch_size, batch_timeout as flashstep's).
in_process.py:          the vanilla diffusers pipeline called in-process: the floor for overhead.

All three run `vanilla.py`'s pipeline call on the same folder flashstep serves, take flashstep's
`POST /generate` JSON body (bench/workload.py) and return a PNG, so each image costs the same work.
"""
