"""Everything that computes: models, loader, KV cache, sampler, scheduler, engine.

No HTTP, no gRPC and no Gradio live in this package."""
