"""vlmlab: do VLMs need Vision Transformers? SSM vs ViT vision encoders in a LLaVA-style VLM."""

__version__ = "0.1.0"
