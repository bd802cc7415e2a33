"""A deterministic corpus of prompts for tokenizer tests: hand-written edge cases plus generated ones."""

import random

HAND_WRITTEN = [
    "a red circle",
    "A photograph of an astronaut riding a horse",
    "",
    "   ",
    "masterpiece, best quality, (detailed face:1.2), [blurry], ((sharp focus))",
    "a cat!!! on a mat???",
    "it's a dog's life, isn't it? they're here, we've been, I'm sure, you'll see, he'd go",
    "IT'S LOUD, THEY'RE HERE",
    "3.14159 and 42, 1,000,000 and 2023-10-05 at 12:30pm",
    "x1.5 zoom 8k uhd 4k 35mm f/1.8 1/250s ISO100",
    "café crème brûlée, naïve façade, jalapeño",
    "Straße in München, Ärger über Öl",
    "東京の夜景, 富士山",
    "서울의 거리, 한국어 프롬프트",
    "москва зимой, красная площадь",
    "αβγ δέλτα, Ωmega",
    "emoji: 🐱🚀🔥 and 👩‍👩‍👧‍👦 and 🏳️‍🌈",
    "flags 🇯🇵🇺🇸 and skin tones 👍🏽👋🏿",
    "tabs\tand\nnewlines\r\nand  double  spaces",
    "\u00a0non-breaking\u00a0spaces\u2003em space\u3000ideographic",
    "curly “quotes” and ‘single’ ones",
    "ligatures: ﬁne ﬂower ﬀ",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３",
    "html entities: fish &amp; chips, &quot;quoted&quot;, caf&eacute;",
    "symbols @#$%^&*()_+-=[]{}|;:,./?~`",
    "under_score and hyphen-ated and slash/separated",
    "zero\u200bwidth\u200bspace and soft\u00adhyphen",
    "combining e\u0301 accents a\u0300 (NFD) vs é",
    "math ∑∫√∞≈≠ and arrows → ← ↑",
    "superscripts x² y³ and fractions ½ ¾ and roman Ⅻ",
    "a\u0007bell\u001bcontrol",
    "mixed CASE WoRdS and CamelCaseWords",
    "<lora:style:0.8> a portrait, BREAK, landscape",
    "ends with punctuation...",
    "!!!",
    "'quoted' and \"double\" and `back`",
    "long-word-supercalifragilisticexpialidocious-antidisestablishmentarianism",
    "a " * 100,
    "photo of " + ", ".join(f"item{i}" for i in range(60)),
    "a very long prompt " + " ".join(["beautiful detailed landscape with mountains"] * 20),
    "numbers 0123456789 9876543210",
    "hello\u2028line\u2029separators",
    "thai ภาษาไทย and arabic العربية and hebrew עברית",
    "hindi हिन्दी and tamil தமிழ்",
    "(((((nested)))))",
    "\\(escaped parens\\) in prompt",
    "a, b, c; d: e. f! g? h",
    "1girl, solo, long hair, looking at viewer, smile",
    "score_9, score_8_up, rating_safe",
    "trailing space ",
    " leading space",
]

_WORDS = ("red green blue circle square triangle star big small left right top bottom on the a of in with "
          "cat dog house tree sky sunset portrait 4k hdr octane render trending artstation by greg rutkowski "
          "photo realistic cinematic lighting ultra detailed").split()
_PIECES = [",", ".", "!", "?", ":", ";", "(", ")", "[", "]", ":1.2", "'s", "'ll", "-", "/", "&", "%", "#", "😀", "🎨",
           "é", "ß", "東", "й", "½", "²", "  ", "\t", "123", "7", "ｘ", "’", "“", "”"]


def corpus(n_generated: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(HAND_WRITTEN)
    for _ in range(n_generated):
        k = rng.randint(1, 40)
        parts = []
        for _ in range(k):
            parts.append(rng.choice(_WORDS) if rng.random() < 0.7 else rng.choice(_PIECES))
            parts.append(" " if rng.random() < 0.8 else "")
        text = "".join(parts)
        if rng.random() < 0.3:
            text = text.upper()
        out.append(text)
    return out
