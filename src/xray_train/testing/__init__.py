"""Stand-ins for what tests, benchmarks and the demo cannot download: a tiny MedGemma-shaped model with the
real Gemma 3 tokenizer (``tiny``), synthetic chest films in each dataset's layout (``synthetic``) and a
pretrained stand-in base for the learning benchmark (``standin``: Gemma 3 270M + a pretrained tower)."""
