"""lmlab.chat, as the README had users import it (`lmlab.chat.CHAT_SAMPLING`): chat sessions and the REPL
(lmlab/infer/chat.py), and the chat templates that lived beside them (lmlab/templates.py)."""

from lmlab.infer.chat import *  # noqa: F401,F403
from lmlab.infer.chat import CHAT_SAMPLING, ChatSession, answer, read_messages, repl, reply  # noqa: F401
from lmlab.templates import *  # noqa: F401,F403
from lmlab.templates import chat_prompt_ids, chat_stop, check_messages, render_chat  # noqa: F401
