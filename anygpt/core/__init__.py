"""The model and the pipeline: config, LLM and LoRA, signal tokens, AnyGPTModel, AnyGPTPipeline."""
