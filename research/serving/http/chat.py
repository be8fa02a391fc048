"""The server's chat templates: research/data/chat.py (shared with chat fine-tuning)."""

from research.data.chat import DEFAULT_TEMPLATE, END_OF_TURN_TOKENS, ChatTemplate
from research.data.tokenizer import read_chat_template

__all__ = ["DEFAULT_TEMPLATE", "END_OF_TURN_TOKENS", "ChatTemplate", "read_chat_template"]
