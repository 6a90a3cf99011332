"""An OpenAI-compatible HTTP server over the CLIs' prefill and decode
(``python -m infer.serve``): protocol, engine, scheduler, app, chat page."""
