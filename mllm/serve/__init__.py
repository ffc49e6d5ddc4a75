"""Serving a model to people and programs: the web demo (`web.py`, gradio) and the OpenAI-compatible HTTP API
(`openai_api.py`). Above the course floor (they may draw synthetic scenes and parse boxes), below the CLI."""
