"""Every fixed text a customer can see, in Chinese and English, chosen by the user's language."""

from __future__ import annotations

from core.messages import Language

TEXTS: dict[str, dict[Language, str]] = {
    "apology": {
        "zh": "抱歉，系统暂时出了点问题，请稍后再试。如需帮助，可以回复“人工”联系客服。",
        "en": "Sorry, something went wrong on our side. Please try again in a moment, "
        'or reply "human" to reach a person.',
    },
    "empty_input": {
        "zh": "您好，请问有什么可以帮您？请直接输入您的问题。",
        "en": "Hello! How can I help you? Please type your question.",
    },
    "input_too_long": {
        "zh": "您的消息太长了（超过 {limit} 个字），请精简后分几条发送。",
        "en": "Your message is too long (over {limit} characters). Please shorten it or send it in parts.",
    },
    "input_cut": {
        "zh": "（您的消息较长，我只读取了前面的部分。）",
        "en": "(Your message was long; I only read the first part of it.)",
    },
    "busy": {
        "zh": "正在处理您的上一条消息，请稍候。",
        "en": "I am still working on your previous message, one moment please.",
    },
    "greeting": {
        "zh": "您好，我是智能客服，请问有什么可以帮您？",
        "en": "Hi, I am the support assistant. How can I help you?",
    },
    "wechat_image_received": {
        "zh": "已收到图片，谢谢！目前我只能阅读文字，请用文字描述您的问题。",
        "en": "Thanks, we received your picture. I can only read text for now: please describe your question.",
    },
    "wechat_voice_unrecognized": {
        "zh": "已收到语音，但没能识别出内容，请用文字再说一遍。",
        "en": "We received your voice message but could not make out the words. Please type your question.",
    },
    "wechat_unsupported": {
        "zh": "已收到您的消息。目前我只能阅读文字，请用文字描述您的问题。",
        "en": "We received your message. I can only read text for now: please describe your question.",
    },
    "wechat_truncated": {
        "zh": "……（回复过长，后面的内容已省略，可以继续追问。）",
        "en": "... (this answer was too long and has been cut; feel free to ask for the rest.)",
    },
}


def text(name: str, language: Language, **values: object) -> str:
    """The fixed text ``name`` in ``language`` (Chinese when the language is unknown)."""
    variants = TEXTS[name]
    template = variants.get(language) or variants["zh"]
    return template.format(**values) if values else template
