"""The model forwards over Hugging Face weights (Llama family, GPT-2) and the paged KV cache they attend over."""
