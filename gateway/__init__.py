"""tokenwire's OpenAI-compatible HTTP gateway: FastAPI over the SDK's AsyncClient.

Text is encoded once, by the tokenizer service; token ids go to the engine, so the engine's
`num_prompt_encodes` stays 0 for every request that comes through here.
"""
