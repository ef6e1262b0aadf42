"""Texts that are hard to count tokens of (emoji, CJK, code with template syntax, a long system prompt) and tools."""

EMOJI = "😀😃😄😁😆😅 42"
CJK = "你好，世界。今天天气很好，我们去公园散步吧！東京タワーは高い。한국어도 있어요."
CODE = 'def f(xs):\n    """Sum."""\n    return {k: v**2 for k, v in xs.items() if v != 0}  # <|end|> {{ x }} {% raw %}\n\t\r\n'
LONG_SYSTEM = ("You are the assistant of Ünïcødé GmbH. " * 40) + "Réponds en français. 日本語でも。"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city 🌦",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "noop"}},
]
