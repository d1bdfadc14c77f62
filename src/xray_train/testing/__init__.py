"""Stand-ins for what tests and the demo cannot download: a tiny MedGemma-shaped model with the real
Gemma 3 tokenizer (``tiny``) and synthetic chest films in each dataset's layout (``synthetic``)."""
