import pytest

from coe.backends.chat import PLAIN_STOP, render_chat, render_plain
from coe.errors import InvalidRequest
from coe.types import ChatMessage

CHATML = ("{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
STRICT = ("{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with the user') }}"
          "{% endif %}{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}")
CONVERSATION = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello"),
                ChatMessage("user", "2+2?"))


def test_chatml_template():
    assert render_chat(CHATML, CONVERSATION) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_template_gets_bos_and_eos_text():
    messages = (ChatMessage("user", "a"), ChatMessage("assistant", "b"))
    assert render_chat(STRICT, messages, bos_text="<s>", eos_text="</s>") == "<s>[user] a</s>[assistant] b</s>"


def test_template_raise_exception_is_an_invalid_request():
    with pytest.raises(InvalidRequest, match="must start with the user") as info:
        render_chat(STRICT, (ChatMessage("system", "x"), ChatMessage("user", "y")))
    assert info.value.param == "messages"
    assert info.value.http_status == 400


def test_broken_template_is_an_invalid_request():
    with pytest.raises(InvalidRequest, match="chat template"):
        render_chat("{% for m in messages %}{{ m.content }}", (ChatMessage("user", "x"),))


def test_template_cannot_reach_python_internals():
    template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InvalidRequest):
        render_chat(template, (ChatMessage("user", "x"),))


def test_no_template_gives_a_plain_transcript():
    text = render_chat(None, CONVERSATION)
    assert text == "Be brief.\nUser: Hi\nAssistant: Hello\nUser: 2+2?\nAssistant:"
    assert text == render_plain(CONVERSATION)
    assert PLAIN_STOP == ("\nUser:",)


def test_plain_transcript_titles_unknown_roles():
    assert render_plain((ChatMessage("tool", "42"), ChatMessage("critic", "meh"))) == \
        "Tool: 42\nCritic: meh\nAssistant:"


@pytest.mark.parametrize("template", [None, CHATML])
def test_empty_messages_are_an_invalid_request(template):
    with pytest.raises(InvalidRequest, match="messages must not be empty"):
        render_chat(template, ())
