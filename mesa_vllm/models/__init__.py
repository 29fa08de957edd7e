"""Model registrations: vLLM's Llama, Mistral, Qwen2 and Phi-3 with RoPE deferred to Mesa."""
