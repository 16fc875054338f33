"""The VLM: prompt templates, the LLM, connectors, and the encoder -> connector -> LLM model."""
