"""What people and clients talk to: the OpenAI-compatible HTTP API (`ui.server.build_app`)
and, mounted on the same app, the Gradio pages."""
