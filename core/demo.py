"""Demo business data for ``kefu seed-demo``: customers, orders and a shop FAQ in Chinese and English.

Seeding is idempotent: rows are matched on a natural key (customer email, identity channel and user,
order number, FAQ language and question) and only missing ones are inserted. The web chat user
``demo`` and the terminal user ``terminal`` are both 张伟, who owns orders in every status, so a
demo can ask "我的订单到哪了" without typing an order number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from sqlmodel import select

from core.db.database import Database
from core.db.models import Customer, CustomerIdentity, FaqEntry, Order


@dataclass(frozen=True)
class _DemoCustomer:
    name: str
    phone: str
    email: str
    identities: tuple[tuple[str, str], ...] = ()
    """(channel, platform user id) pairs linked to this customer."""


@dataclass(frozen=True)
class _DemoOrder:
    number: str
    email: str
    status: str
    items: tuple[tuple[str, str, int, int], ...]
    """(sku, name, quantity, unit price in cents)."""
    created: datetime
    carrier: str | None = None
    tracking_number: str | None = None
    eta: date | None = None
    currency: str = "CNY"


@dataclass(frozen=True)
class _DemoFaq:
    question: str
    answer: str
    alternatives: tuple[str, ...] = ()
    tags: tuple[str, ...] = field(default=())


def _at(y: int, m: int, d: int, hh: int = 10, mm: int = 0) -> datetime:
    return datetime(y, m, d, hh, mm, tzinfo=UTC)


CUSTOMERS: tuple[_DemoCustomer, ...] = (
    _DemoCustomer(
        "张伟", "13800138000", "zhang.wei@example.com", (("web", "demo"), ("terminal", "terminal"))
    ),
    _DemoCustomer("李娜", "13900139001", "li.na@example.com"),
    _DemoCustomer("王芳", "13700137002", "wang.fang@example.com"),
    _DemoCustomer("Emily Chen", "+1 415 555 0134", "emily.chen@example.com"),
    _DemoCustomer("James Miller", "+44 20 7946 0958", "james.miller@example.com"),
)

ORDERS: tuple[_DemoOrder, ...] = (
    _DemoOrder(
        "KF20251103001",
        "zhang.wei@example.com",
        "delivered",
        (("SKU-EB201", "无线降噪耳机 EB201 黑色", 1, 59900),),
        _at(2025, 11, 3, 2, 15),
        carrier="顺丰速运",
        tracking_number="SF1402387765210",
        eta=date(2025, 11, 5),
    ),
    _DemoOrder(
        "KF20251108002",
        "zhang.wei@example.com",
        "refunding",
        (("SKU-TS113", "纯棉圆领T恤 白色 L", 2, 7900), ("SKU-SK010", "运动袜 三双装", 1, 2990)),
        _at(2025, 11, 8, 6, 40),
        carrier="中通快递",
        tracking_number="78341256093317",
        eta=date(2025, 11, 11),
    ),
    _DemoOrder(
        "KF20251118003",
        "zhang.wei@example.com",
        "shipped",
        (("SKU-KB087", "机械键盘 K87 茶轴", 1, 34900), ("SKU-MP002", "加厚鼠标垫", 1, 3900)),
        _at(2025, 11, 18, 12, 5),
        carrier="京东物流",
        tracking_number="JDVA20931874652",
        eta=date(2025, 11, 21),
    ),
    _DemoOrder(
        "KF20251120004",
        "zhang.wei@example.com",
        "paid",
        (("SKU-PB200", "20000mAh 移动电源", 1, 14900),),
        _at(2025, 11, 20, 9, 30),
    ),
    _DemoOrder(
        "KF20251105005",
        "li.na@example.com",
        "cancelled",
        (("SKU-CM350", "便携咖啡机 C350", 1, 42900),),
        _at(2025, 11, 5, 3, 50),
    ),
    _DemoOrder(
        "KF20251117006",
        "li.na@example.com",
        "shipped",
        (("SKU-SC500", "保湿面霜 50ml", 2, 18800),),
        _at(2025, 11, 17, 8, 20),
        carrier="圆通速递",
        tracking_number="YT7519034826611",
        eta=date(2025, 11, 20),
    ),
    _DemoOrder(
        "KF20251110007",
        "wang.fang@example.com",
        "delivered",
        (("SKU-RC300", "智能电饭煲 3L", 1, 39900),),
        _at(2025, 11, 10, 1, 10),
        carrier="顺丰速运",
        tracking_number="SF1402391158804",
        eta=date(2025, 11, 12),
    ),
    _DemoOrder(
        "KF20251116008",
        "emily.chen@example.com",
        "shipped",
        (("SKU-EB201", "EB201 wireless noise-cancelling earbuds, black", 1, 8900),),
        _at(2025, 11, 16, 15, 0),
        carrier="DHL Express",
        tracking_number="1234567890",
        eta=date(2025, 11, 22),
        currency="USD",
    ),
    _DemoOrder(
        "KF20251121009",
        "emily.chen@example.com",
        "paid",
        (("SKU-BP020", "Everyday backpack 20L, grey", 1, 5900), ("SKU-BT750", "Water bottle 750ml", 2, 1900)),
        _at(2025, 11, 21, 17, 45),
        currency="USD",
    ),
    _DemoOrder(
        "KF20251104010",
        "james.miller@example.com",
        "delivered",
        (("SKU-KB087", "K87 mechanical keyboard, brown switches", 1, 4900),),
        _at(2025, 11, 4, 11, 25),
        carrier="DHL Express",
        tracking_number="9876543210",
        eta=date(2025, 11, 10),
        currency="USD",
    ),
)

FAQ_ZH: tuple[_DemoFaq, ...] = (
    _DemoFaq(
        "下单后多久发货？",
        "现货商品在付款后 48 小时内发货（大促期间 72 小时内），预售商品以商品页标注的发货时间为准。"
        "发货后您会收到短信通知，也可以随时把订单号发给我查询进度。",
        ("什么时候发货", "付款了怎么还没发货", "多久能发出"),
        ("发货", "物流"),
    ),
    _DemoFaq(
        "快递一般几天能到？",
        "江浙沪及周边一般 1–2 天送达，其他大部分地区 2–4 天，偏远地区（新疆、西藏等）约 5–7 天。"
        "具体以快递公司的实际派送为准。",
        ("几天到货", "多久能收到", "配送要多长时间"),
        ("物流", "时效"),
    ),
    _DemoFaq(
        "发什么快递？可以指定快递吗？",
        "默认发顺丰、京东物流或中通，由仓库根据收货地址选择最快的快递。"
        "如需指定快递，请在下单时备注，我们会尽量安排；指定顺丰可能需要补运费差价。",
        ("用的什么快递", "能发顺丰吗", "可以选快递公司吗"),
        ("物流", "快递"),
    ),
    _DemoFaq(
        "运费怎么算？包邮吗？",
        "单笔订单实付满 99 元全国包邮（港澳台及海外除外），不满 99 元收取 8 元运费。"
        "会员每月另有 2 张免邮券。",
        ("包不包邮", "运费多少", "满多少包邮"),
        ("运费", "物流"),
    ),
    _DemoFaq(
        "怎么查物流？",
        "在「我的订单」里点开订单即可看到快递公司和运单号及最新轨迹；"
        "也可以直接把订单号（如 KF20251103001）发给我，我帮您查。",
        ("物流信息在哪看", "我的快递到哪了", "查询快递单号"),
        ("物流", "订单"),
    ),
    _DemoFaq(
        "可以修改收货地址吗？",
        "订单发货前可以修改：在「我的订单」中点「修改地址」，或把订单号和新地址发给我，我帮您提交。"
        "已经发货的订单无法在系统里修改，可以联系快递员改派或转人工协助。",
        ("地址填错了", "怎么改收货地址", "想换个收货地址"),
        ("地址", "订单"),
    ),
    _DemoFaq(
        "怎么取消订单？",
        "未发货的订单可以在「我的订单」中直接取消，款项原路退回。"
        "已发货的订单不能取消，可以拒收或收货后申请退货。",
        ("不想要了", "订单能取消吗", "取消订单"),
        ("订单", "取消"),
    ),
    _DemoFaq(
        "支持七天无理由退货吗？",
        "支持。签收后 7 天内，商品及包装完好、不影响二次销售的，可申请无理由退货。"
        "定制商品、贴身衣物、已拆封的食品和化妆品等不适用。",
        ("7天无理由", "能退货吗", "不喜欢可以退吗"),
        ("退货", "售后"),
    ),
    _DemoFaq(
        "退货流程是怎样的？",
        "在「我的订单」中点「申请售后」→ 选择退货原因并上传照片 → 审核通过后按页面上的地址寄回，"
        "并填写退货运单号。仓库签收检查后 1 个工作日内为您退款。",
        ("怎么退货", "退货步骤", "如何申请退货"),
        ("退货", "售后"),
    ),
    _DemoFaq(
        "退货运费谁出？",
        "商品质量问题或发错货，来回运费由我们承担；无理由退货的寄回运费由您承担，"
        "购买了运费险的订单由保险公司按规则赔付。",
        ("退货要自己付邮费吗", "退货运费", "运费险怎么用"),
        ("退货", "运费"),
    ),
    _DemoFaq(
        "退款多久到账？",
        "退款审核通过后原路退回：微信支付、支付宝一般 1–3 个工作日到账，银行卡 3–7 个工作日，"
        "花呗分期退回后会自动取消剩余分期。",
        ("退款什么时候到", "钱怎么还没退回来", "退款进度"),
        ("退款", "售后"),
    ),
    _DemoFaq(
        "收到的商品有质量问题怎么办？",
        "非常抱歉！请在签收后 15 天内在「申请售后」中选择「质量问题」并上传照片或视频，"
        "我们核实后为您免费换新或全额退款，来回运费由我们承担。",
        ("商品坏了", "东西有瑕疵", "质量有问题"),
        ("售后", "质量"),
    ),
    _DemoFaq(
        "尺码不合适可以换货吗？",
        "签收后 7 天内可以换尺码或颜色（库存允许时），在「申请售后」中选择「换货」即可。"
        "寄回运费由您承担，换出的新商品由我们包邮寄出。",
        ("怎么换货", "换个尺码", "颜色不喜欢能换吗"),
        ("换货", "售后"),
    ),
    _DemoFaq(
        "怎么开发票？",
        "我们提供电子普通发票和增值税专用发票。下单时在「发票」栏填写抬头和税号即可；"
        "电子发票在确认收货后 48 小时内发送到您的邮箱，也可以在订单详情中下载。",
        ("能开发票吗", "电子发票在哪下载", "开专票"),
        ("发票",),
    ),
    _DemoFaq(
        "发票可以补开或者修改抬头吗？",
        "确认收货后 90 天内可以在订单详情中申请补开发票；抬头或税号填错的，可申请换开一次，"
        "原发票作废后重新开具。",
        ("发票抬头写错了", "下单时忘了开发票", "换开发票"),
        ("发票",),
    ),
    _DemoFaq(
        "支持哪些付款方式？",
        "支持微信支付、支付宝、银联借记卡和信用卡，以及花呗分期。企业客户可选择对公转账。",
        ("怎么付款", "可以用信用卡吗", "能用支付宝吗"),
        ("支付",),
    ),
    _DemoFaq(
        "付款失败了怎么办？",
        "请先确认银行卡余额和单笔限额，或换一种支付方式再试。若已扣款但订单仍显示未付款，"
        "款项一般会在 1–3 个工作日内自动退回，不会重复扣费。",
        ("支付不成功", "扣钱了但订单没付款", "付不了款"),
        ("支付",),
    ),
    _DemoFaq(
        "支持货到付款吗？",
        "目前暂不支持货到付款，您可以使用微信支付或支付宝在线付款，未发货前可随时取消并全额退款。",
        ("能货到付款吗", "到付", "收货再付钱"),
        ("支付",),
    ),
    _DemoFaq(
        "可以分期付款吗？",
        "单笔满 300 元可使用花呗分期（3/6/12 期），部分商品享受免息，以支付页面显示为准。",
        ("花呗分期", "能分期吗", "免息分期"),
        ("支付", "分期"),
    ),
    _DemoFaq(
        "会员有哪些权益？",
        "注册即成为普通会员；年消费满 1000 元升级为金卡会员，享全场 95 折、生日礼券、每月 2 张免邮券"
        "和优先客服通道。",
        ("怎么成为会员", "会员有什么用", "金卡会员"),
        ("会员",),
    ),
    _DemoFaq(
        "积分怎么获得和使用？",
        "每消费 1 元得 1 积分，评价晒单另得积分。100 积分可抵扣 1 元，下单时在结算页勾选使用即可；"
        "积分有效期为获得之日起 12 个月。",
        ("积分有什么用", "积分抵现", "积分会过期吗"),
        ("会员", "积分"),
    ),
    _DemoFaq(
        "优惠券为什么用不了？",
        "请检查优惠券是否在有效期内、是否满足使用门槛，以及商品是否在适用范围内。"
        "特价商品和部分品牌不参与用券，一个订单只能使用一张店铺券。",
        ("优惠券不能用", "怎么用优惠券", "券显示不可用"),
        ("优惠券", "促销"),
    ),
    _DemoFaq(
        "商品保修多久？",
        "数码和家电类商品自签收之日起享受 1 年质保（部分品牌 2 年，以商品页为准），"
        "7 天内出现质量问题可退货，15 天内可换新。",
        ("保修期多长", "质保多久", "有保修吗"),
        ("保修", "售后"),
    ),
    _DemoFaq(
        "怎么申请保修维修？",
        "在「我的订单」中找到商品，点「申请售后」→「维修」，描述故障并上传照片，"
        "审核通过后寄回即可。保修期内维修免费，修好后包邮寄回，一般 7–10 个工作日。",
        ("坏了怎么修", "售后维修", "保修流程"),
        ("保修", "售后"),
    ),
    _DemoFaq(
        "买完就降价了，可以补差价吗？",
        "支持 7 天价格保护：签收后 7 天内同一商品降价（不含限时秒杀和直播专享价），"
        "可在订单详情中申请价保，差价退回原支付账户。",
        ("降价补差", "价格保护", "刚买就便宜了"),
        ("价保", "促销"),
    ),
    _DemoFaq(
        "怎么联系人工客服？",
        "在对话中发送「转人工」就会为您接入人工客服。人工客服工作时间为每天 9:00–21:00，"
        "非工作时间留言我们会在上班后第一时间回复。",
        ("转人工", "找真人客服", "人工服务"),
        ("人工", "客服"),
    ),
    _DemoFaq(
        "客服工作时间是什么时候？",
        "智能客服 24 小时在线；人工客服每天 9:00–21:00（节假日照常）。",
        ("客服几点上班", "晚上有人工吗", "客服在线时间"),
        ("客服",),
    ),
    _DemoFaq(
        "收到的商品少件或者发错了怎么办？",
        "非常抱歉！请在签收后 48 小时内拍下包裹面单和商品照片，在「申请售后」中选择「少件/错发」，"
        "核实后我们会补发或换货，运费由我们承担。",
        ("少发了", "发错货了", "包裹里少东西"),
        ("售后", "物流"),
    ),
    _DemoFaq(
        "物流显示已签收，但我没收到？",
        "请先看看快递柜、驿站、门卫或家人是否代收。仍找不到的话，把订单号发给我，"
        "我们会联系快递公司核实，确认丢件后为您补发或退款。",
        ("显示签收了没收到", "快递丢了", "包裹找不到"),
        ("物流", "售后"),
    ),
    _DemoFaq(
        "能寄到港澳台或者海外吗？",
        "支持寄往港澳台及部分海外国家和地区，运费和时效在结算页按地址计算，可能产生的进口关税由收件人承担。",
        ("发国外吗", "寄香港", "海外配送"),
        ("物流", "国际"),
    ),
    _DemoFaq(
        "预售商品什么时候发货？",
        "预售商品按商品页标注的发货时间发货，支付定金后需在尾款期内支付尾款；"
        "定金在未付尾款时不予退还，因我方原因延迟发货的除外。",
        ("预售多久发货", "定金能退吗", "什么时候付尾款"),
        ("发货", "预售"),
    ),
    _DemoFaq(
        "怎么修改账户绑定的手机号？",
        "在「我的」→「账户设置」→「手机号」中，通过原手机号验证码验证后即可更换；"
        "原手机号已停用的，请转人工提供身份信息后协助修改。",
        ("换绑手机号", "手机号不用了", "修改手机号码"),
        ("账户",),
    ),
)

FAQ_EN: tuple[_DemoFaq, ...] = (
    _DemoFaq(
        "How soon will my order ship?",
        "In-stock items ship within 48 hours of payment (72 hours during big sales). Pre-order items "
        "ship on the date shown on the product page. You get a notification as soon as it ships.",
        ("When will you ship my order?", "Why hasn't my order shipped yet?"),
        ("shipping",),
    ),
    _DemoFaq(
        "How long does delivery take?",
        "Within mainland China delivery usually takes 1-4 days. International orders take 5-10 "
        "business days depending on the destination and customs.",
        ("How many days until I receive it?", "What is the delivery time?"),
        ("shipping", "delivery"),
    ),
    _DemoFaq(
        "How can I track my order?",
        "Open the order under 'My orders' to see the carrier, tracking number and latest status, "
        "or just send me your order number (for example KF20251116008) and I'll look it up.",
        ("Where is my package?", "Where can I find my tracking number?"),
        ("shipping", "orders"),
    ),
    _DemoFaq(
        "Can I change my shipping address?",
        "Yes, as long as the order has not shipped: use 'Change address' in the order, or send me the "
        "order number and the new address. Once shipped, the carrier may be able to redirect it.",
        ("I entered the wrong address", "How do I update my delivery address?"),
        ("address", "orders"),
    ),
    _DemoFaq(
        "How do I cancel an order?",
        "Orders that have not shipped can be cancelled in 'My orders' and are refunded in full. "
        "Shipped orders can't be cancelled, but you can refuse delivery or return the item.",
        ("I want to cancel my order", "Can I still cancel?"),
        ("orders", "cancellation"),
    ),
    _DemoFaq(
        "What is your return policy?",
        "You can return most items within 7 days of delivery for any reason, provided they are unused "
        "and in their original packaging. Custom-made items, underwear and opened cosmetics or food "
        "are excluded.",
        ("Can I return an item?", "Do you accept returns?"),
        ("returns",),
    ),
    _DemoFaq(
        "How do I return an item?",
        "Go to 'My orders', choose 'After-sales service', pick a reason and add photos. Once approved, "
        "send the item to the address shown and enter the return tracking number. Return shipping is "
        "free if the item is faulty or we sent the wrong one.",
        ("How do I send something back?", "Return process"),
        ("returns",),
    ),
    _DemoFaq(
        "When will I get my refund?",
        "Refunds go back to the original payment method: 1-3 business days for WeChat Pay and Alipay, "
        "3-7 business days for bank cards, after the warehouse has received and checked the return.",
        ("Where is my refund?", "How long do refunds take?"),
        ("refunds",),
    ),
    _DemoFaq(
        "Which payment methods do you accept?",
        "WeChat Pay, Alipay, UnionPay, Visa and Mastercard. Business customers can also pay by bank "
        "transfer. Cash on delivery is not available.",
        ("Can I pay by credit card?", "Do you take PayPal?"),
        ("payment",),
    ),
    _DemoFaq(
        "How do I get an invoice?",
        "Add your invoice title (and tax number for a company) at checkout. The e-invoice is emailed "
        "within 48 hours after you confirm delivery and can be downloaded from the order page.",
        ("I need a receipt", "Can I get a VAT invoice?"),
        ("invoice",),
    ),
    _DemoFaq(
        "Do you ship internationally?",
        "Yes, we ship to Hong Kong, Macao, Taiwan and many countries. Shipping cost and delivery time "
        "are calculated at checkout; import duties, if any, are paid by the recipient.",
        ("Can you ship to the US?", "Do you deliver overseas?"),
        ("shipping", "international"),
    ),
    _DemoFaq(
        "What do members get?",
        "Every registered customer is a member. Spend 1,000 yuan in a year to become a Gold member: "
        "5% off everything, a birthday coupon, two free-shipping coupons a month and priority support.",
        ("How does membership work?", "What are the membership benefits?"),
        ("membership",),
    ),
    _DemoFaq(
        "What warranty do you offer?",
        "Electronics and appliances come with a 1-year warranty from delivery (2 years for some brands, "
        "see the product page). Faulty items can be returned within 7 days or replaced within 15 days.",
        ("Is there a warranty?", "How do I get a repair?"),
        ("warranty",),
    ),
    _DemoFaq(
        "My item arrived damaged or with a part missing. What should I do?",
        "Sorry about that! Within 48 hours of delivery, take photos of the parcel label and the item "
        "and open an after-sales request. We will send a replacement or refund you, at our cost.",
        ("I received the wrong item", "Something is broken"),
        ("returns", "damaged"),
    ),
    _DemoFaq(
        "How can I talk to a human agent?",
        "Just say 'human' or 'agent' in this chat and I'll hand you over. Our team is available every "
        "day from 9:00 to 21:00 (China time); messages outside those hours are answered next morning.",
        ("I want to speak to a person", "Customer service hours"),
        ("human", "support"),
    ),
)


async def seed_demo(db: Database) -> dict[str, int]:
    """Insert the demo customers, identities, orders and FAQ that are missing; return what was added.

    Keys of the result: ``customers``, ``customer_identities``, ``orders``, ``faq_entries``. A second
    run returns zeros.
    """
    counts = {"customers": 0, "customer_identities": 0, "orders": 0, "faq_entries": 0}
    async with db.session() as session:
        by_email: dict[str, Customer] = {}
        emails = [c.email for c in CUSTOMERS]
        existing = await session.exec(select(Customer).where(Customer.email.in_(emails)))  # type: ignore[union-attr]
        for customer in existing:
            if customer.email is not None:
                by_email.setdefault(customer.email, customer)
        for demo in CUSTOMERS:
            if demo.email not in by_email:
                customer = Customer(name=demo.name, phone=demo.phone, email=demo.email)
                session.add(customer)
                by_email[demo.email] = customer
                counts["customers"] += 1
        await session.flush()  # assigns customer ids for the rows below

        known_identities = set(
            (await session.exec(select(CustomerIdentity.channel, CustomerIdentity.platform_user_id))).all()
        )
        for demo in CUSTOMERS:
            for channel, user_id in demo.identities:
                if (channel, user_id) not in known_identities:
                    customer_id = by_email[demo.email].id
                    assert customer_id is not None
                    session.add(
                        CustomerIdentity(customer_id=customer_id, channel=channel, platform_user_id=user_id)
                    )
                    counts["customer_identities"] += 1

        numbers = [o.number for o in ORDERS]
        known_orders = set((await session.exec(select(Order.id).where(Order.id.in_(numbers)))).all())  # type: ignore[attr-defined]
        for demo_order in ORDERS:
            if demo_order.number not in known_orders:
                session.add(_order(demo_order, by_email[demo_order.email].id))
                counts["orders"] += 1

        known_faq = set((await session.exec(select(FaqEntry.language, FaqEntry.question))).all())
        for language, entries in (("zh", FAQ_ZH), ("en", FAQ_EN)):
            for faq in entries:
                if (language, faq.question) not in known_faq:
                    session.add(
                        FaqEntry(
                            question=faq.question,
                            alternatives=list(faq.alternatives),
                            answer=faq.answer,
                            language=language,
                            tags=list(faq.tags),
                        )
                    )
                    counts["faq_entries"] += 1
        await session.commit()
    return counts


def _order(demo: _DemoOrder, customer_id: int | None) -> Order:
    items: list[dict[str, Any]] = [
        {"sku": sku, "name": name, "quantity": qty, "unit_price_cents": price}
        for sku, name, qty, price in demo.items
    ]
    return Order(
        id=demo.number,
        customer_id=customer_id,
        status=demo.status,
        carrier=demo.carrier,
        tracking_number=demo.tracking_number,
        eta=demo.eta,
        items=items,
        total_cents=sum(qty * price for _, _, qty, price in demo.items),
        currency=demo.currency,
        created_at=demo.created,
        updated_at=demo.created,
    )
