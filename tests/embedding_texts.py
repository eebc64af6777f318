"""Varied texts for the embedding tests: short and long, punctuation, Unicode (accents, CJK, Cyrillic,
Arabic, emoji), numbers, code, odd whitespace; every one within all-MiniLM-L6-v2's 256 tokens."""

TEXTS = [
    "Hello world",
    "a",
    "The cat sits on the mat.",
    "A feline is resting on a small rug near the door.",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates by 0.75%.",
    "What's the capital of France? Paris!!! (obviously...)",
    "!!!???...,,,;;;:::---___",
    "Café naïve résumé — Zoë's crème brûlée",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "مرحبا بالعالم",
    "I love pizza 🍕🍕 and tacos 🌮!",
    "3.14159 2.71828 1,000,000 -42 +7 1e-9 0x1F",
    "Call 555-0199 before 11:59 PM on 12/31/2024.",
    "def add(a, b):\n    return a + b  # simple",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nmixed",
    "UPPERCASE TEXT SHOULD BE LOWERCASED BY THE TOKENIZER",
    "The [CLS] and [SEP] tokens written in the text itself.",
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    " ".join(["The quick brown fox jumps over the lazy dog."] * 18),  # ~180 tokens: the long one
    "Machine learning models map sentences to dense vectors so that similar meanings lie close together.",
    "email@example.com https://example.org/path?q=1&x=y#frag",
]
