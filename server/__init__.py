"""flashstep's HTTP server: FastAPI app, dynamic batcher, admin, metrics, playground.

    settings.py       Settings (FLASHSTEP_* variables, `flashstep serve` flags)
    app.py            create_app(settings): services, routers, lifespan (models load there)
    serve.py          serve_main(argv): flags -> Settings -> uvicorn (`python -m server`)
    schemas.py        request/response bodies (pydantic)
    generation.py     the generation service both generation routes share
    batcher.py        dynamic batching, one worker thread per device
    model_manager.py  load / unload / default / hot swap, leases of in-flight batches
    image_store.py    bounded, expiring store behind response_format=url
    errors.py         the error boundary: exceptions -> OpenAI-shaped HTTP errors
    metrics.py        Prometheus metrics
    lifecycle.py      loading / ready / failed / shutting down
    routes/           images (OpenAI), generate (native), admin, health, playground
    static/           the playground page
"""
