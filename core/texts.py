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
    "rate_limited": {
        "zh": "您发送消息的速度有点快，请稍等一分钟再继续，我们会认真回复每一个问题。",
        "en": "You are sending messages a little fast. Please wait a minute before continuing; "
        "we will answer every question.",
    },
    "handoff_timeout": {
        "zh": "抱歉，人工客服暂时都在忙，未能及时接入。您的问题已记录在工单中，我们会尽快跟进；"
        "现在您也可以继续向我提问。",
        "en": "Sorry, none of our team could take your conversation in time. Your request is kept in a "
        "ticket and we will follow up; meanwhile you can keep asking me here.",
    },
    "handoff_waiting": {
        "zh": "已为您转接人工客服，请稍候",
        "en": "Connecting you to a person, please wait",
    },
    "handoff_agent_joined": {
        "zh": "人工客服已接入，接下来由客服为您服务。",
        "en": "A member of our team has joined the conversation and will help you from here.",
    },
    "handoff_agent_left": {
        "zh": "人工客服已离开，接下来由智能客服继续为您服务。如需再次转人工，请回复“人工”。",
        "en": 'Our team member has left the conversation; the assistant is back. Reply "human" to reach '
        "a person again.",
    },
    "greeting": {
        "zh": "您好，我是智能客服，请问有什么可以帮您？",
        "en": "Hi, I am the support assistant. How can I help you?",
    },
    "telegram_help": {
        "zh": "直接发送您的问题，我会尽快回答。\n"
        "在群组里请 @我 或回复我的消息。\n"
        "/start 开始对话\n/help 使用帮助\n/human 联系人工客服",
        "en": "Just send me your question and I will answer it.\n"
        "In groups, mention me or reply to one of my messages.\n"
        "/start start a conversation\n/help this help\n/human talk to a person",
    },
    "telegram_text_only": {
        "zh": "抱歉，我目前只能阅读文字消息，请用文字描述您的问题。",
        "en": "Sorry, I can only read text for now. Please type your question.",
    },
    "wechat_image_received": {
        "zh": "已收到图片，谢谢！目前我只能阅读文字，请用文字描述您的问题。",
        "en": "Thanks, we received your picture. I can only read text for now: "
        "please describe your question.",
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
    "output_blocked": {
        "zh": "抱歉，这个问题我暂时无法这样回答。我可以帮您查询订单、物流、退换货等问题；"
        "如需进一步帮助，可以回复“人工”联系客服。",
        "en": "Sorry, I can't answer that in this way. I can help with orders, delivery, returns and "
        'similar questions; reply "human" if you would like to talk to a person.',
    },
    "limited_mode_note": {
        "zh": "（智能客服正在简化模式下运行，以上为常见问题解答。如需进一步帮助，请回复“人工”。）",
        "en": '(The assistant is running in limited mode; this is a standard FAQ answer. Reply "human" '
        "if you need more help.)",
    },
    "limited_mode_unknown": {
        "zh": "抱歉，智能客服暂时无法回答这个问题。您的消息已记录，客服会尽快跟进；"
        "也可以回复“人工”联系人工客服，或留下联系方式为您创建工单。",
        "en": "Sorry, the assistant cannot answer this right now. We have kept your message and the team "
        'will follow up; reply "human" to reach a person, or leave your contact details for a ticket.',
    },
    "limited_mode_suggest": {
        "zh": "抱歉，智能客服正在简化模式下运行，没能确定您的问题。您想问的是下面哪一个？回复序号即可：",
        "en": "Sorry, the assistant is running in limited mode and is not sure what you are asking. "
        "Is it one of these? Reply with its number:",
    },
    "limited_mode_suggest_none": {
        "zh": "都不是？您的消息已记录，客服会尽快跟进；也可以回复“人工”联系人工客服。",
        "en": 'None of these? We have kept your message and the team will follow up; reply "human" to '
        "reach a person.",
    },
}


def text(name: str, language: Language, **values: object) -> str:
    """The fixed text ``name`` in ``language`` (Chinese when the language is unknown)."""
    variants = TEXTS[name]
    template = variants.get(language) or variants["zh"]
    return template.format(**values) if values else template
