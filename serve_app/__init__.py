"""serve_app: an OpenAI-compatible LLM endpoint on Ray Serve + vLLM with Gemini overflow."""

__version__ = "0.1.0"
