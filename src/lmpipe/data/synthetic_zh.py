"""The Chinese share of the embedded default: generated stories, reviews and instructions, and noise.

The same three kinds as the English generator (:mod:`lmpipe.data.synthetic`), written for Chinese
rather than translated from it: 3-paragraph stories from a small grammar (about 200-300 characters),
labelled product and film reviews whose sentiment the words carry, and instruction/answer pairs
(arithmetic word problems with correct answers, antonyms, capitals). Every clean document passes the
Chinese profile of ``clean`` (FineWeb-2's ``cmn_Hani`` thresholds on jieba words). Noise: exact
and near copies, repeated spam lines, web boilerplate, and personal data (mainland mobile and
resident ID numbers) for PII redaction; each tagged with ``meta.noise``. Documents carry
``meta.language = "zh"``.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

Record = tuple[str, dict[str, object]]
NOISE_KINDS = ("exact_duplicate", "near_duplicate", "repetitive_spam", "boilerplate", "pii")


def _p(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split("|"))


NAMES = _p("李明|王芳|张伟|刘洋|陈静|杨帆|赵磊|黄丽|周杰|吴敏|徐亮|孙悦|马超|朱琳|胡波|郭峰|林雪|何平|高远|罗兰")
ROLES = _p("面包师|渔夫|木匠|老师|医生|邮递员|园丁|裁缝|画家|厨师|农民|图书管理员|钟表匠|船长|药剂师")
TRAITS = _p("细心|勇敢|害羞|固执|开朗|聪明|安静|耐心|善良|好奇")
PLACES = _p("海边的一个小村子|山脚下的一座小镇|河边的一间老房子|城东的一条窄巷|果园旁边的农场|湖中间的一个小岛|"
            "雪山下的一个村庄|火车站后面的老街")
OBJECTS = _p("一把铜钥匙|一张旧地图|一支木笛|一个银盒子|一把蓝雨伞|一个旧指南针|一罐蜂蜜|一只红风筝|一本皮面笔记本|"
             "一盏旧灯笼|一封没有寄出的信|一个音乐盒")
FOUND = _p("在旧木箱里|在井边的石头下|在借来的外套口袋里|在老橡树的树根之间|在阁楼的角落里|在市场的一个篮子里")
NEWS = _p("河上的桥塌了|村里的井干了|冬天的粮食被雨水泡坏了|老磨坊的水车不转了|通往城里的路被大雪堵住了|"
          "节日用的灯笼被人偷走了")
FEELINGS = _p("担心|高兴|奇怪|紧张|好奇|惊讶|不安|激动")
ROUTINES = _p("去码头看渔船回来|把门前的小路扫干净|给院子里的花浇水|给邻居送去新烤的面包|在窗边读一会儿书|"
              "帮别人修理坏掉的东西")
TRAVEL = _p("沿着河岸走了一整天|坐船穿过了海湾|翻过了一座小山|坐夜班火车进了城|顺着旧车道往北走")
DESTS = _p("山顶的旧塔|邻镇的集市|城里的图书馆|瀑布后面的山洞|河对岸的农场")
HELPERS = _p("给他们指了一条近路|借给他们一盏灯和一张地图|请他们喝了一碗热汤|讲了一个关于沉船的老故事|"
             "提醒他们山谷里有狼")
ENDINGS = _p("大家一起用三天时间修好了坏掉的东西|他们终于找到了失主，那位老人高兴得流下了眼泪|"
             "城里寄来的一封信带来了他们一直在等的答案|水车又开始转了，村子里恢复了往日的热闹")
LESSONS = _p("小小的善意也能走得很远|向别人求助并不丢人|耐心能解决力气解决不了的问题|朋友比财宝更珍贵|"
             "好奇心也是一种勇气")


def story(rng: random.Random) -> Record:
    """Three paragraphs: who and where, what happened and the journey, how it ended."""
    a, b, c = rng.sample(NAMES, 3)
    role, role_b, role_c = rng.sample(ROLES, 3)
    obj = rng.choice(OBJECTS)
    intro = (f"从前，在{rng.choice(PLACES)}，住着一位{rng.choice(TRAITS)}的{role}，名叫{a}。"
             f"{a}每天早上{rng.choice(ROUTINES)}，傍晚的时候再{rng.choice(ROUTINES)}。")
    if rng.random() < 0.5:
        event = (f"有一天，{a}{rng.choice(FOUND)}发现了{obj}。{a}从来没有见过这样的东西，心里觉得很"
                 f"{rng.choice(FEELINGS)}。于是{a}把它拿给住在隔壁的{role_b}{b}看。")
    else:
        event = (f"有一天，{role_b}{b}来敲门，带来一个坏消息：{rng.choice(NEWS)}。{a}虽然有些"
                 f"{rng.choice(FEELINGS)}，还是带上{obj}，穿好外套出了门。")
    journey = (f"“我们该怎么办？”{a}问。“我们一起去{rng.choice(DESTS)}看看吧。”{b}回答。第二天，他们"
               f"{rng.choice(TRAVEL)}。路上他们遇到了{role_c}{c}，{c}{rng.choice(HELPERS)}。")
    ending = (f"最后，{rng.choice(ENDINGS)}。{a}明白了一个道理：{rng.choice(LESSONS)}。从那以后，{a}和{b}"
              f"成了最好的朋友，每个星期都会一起吃一顿饭。")
    return "\n\n".join([intro, event + journey, ending]), {"kind": "story", "language": "zh"}


PRODUCTS = _p("无线耳机|咖啡机|登山包|台灯|电水壶|跑步鞋|吸尘器|蓝牙音箱|办公椅|电饭煲|雨衣|键盘")
FILMS = _p("《沉默的港口》|《最后的车站》|《玻璃花园》|《北方的河》|《纸船》|《冬天的信》|《远方的灯塔》")
PRODUCT_ASPECTS = _p("做工|外观|价格|声音|续航|包装|说明书|重量|材料|售后服务|手感|颜色")
FILM_ASPECTS = _p("剧情|演技|配乐|画面|对白|节奏|结尾|特效|服装|主角的表演|镜头|台词")
POSITIVE = _p("很好|出色|精致|令人满意|非常舒服|很有质感|让人惊喜|十分用心|很可靠|相当漂亮|无可挑剔|超出预期")
NEGATIVE = _p("很差|粗糙|令人失望|很不舒服|非常廉价|让人生气|十分马虎|不可靠|相当难看|很无聊|一塌糊涂|远低于预期")
# each template at most once per review, so no phrase repeats enough to look like spam
ASPECT_LINES = _p("{a}{g}。|我觉得它的{a}{g}。|说实话，{a}也{g}。|让我印象最深的是{a}，{g}。|朋友也说{a}{g}。|"
                  "至于{a}，我只能说{g}。|{a}方面，整体来看{g}。|和以前用过的相比，{a}{g}。")
CONTEXT = {"product": _p("我平时上班和周末出门都会用到它。|家里人也轮流用了一段时间。|买之前我在网上比较了好几家店。"),
           "movie": _p("电影院里坐满了人，大家看得很认真。|散场以后我们在路上讨论了很久。|这部片子之前的宣传做得很多。")}
VERDICTS = {"positive": _p("我会推荐给身边的朋友。|总的来说，这次买得很值。|我给五颗星，下次还会再来。|这是一个很好的选择。"),
            "negative": _p("我不会推荐给任何人。|总的来说，这次的钱白花了。|我只给一颗星，已经很客气了。|"
                           "这是一个很差的选择。")}


def review(rng: random.Random) -> Record:
    """A product or film review with its sentiment label in meta."""
    label = rng.choice(("positive", "negative"))
    good = POSITIVE if label == "positive" else NEGATIVE
    if rng.random() < 0.5:
        topic, aspects = "product", PRODUCT_ASPECTS
        opening = f"上个月我买了这款{rng.choice(PRODUCTS)}，到现在已经用了好几个星期了。"
    else:
        topic, aspects = "movie", FILM_ASPECTS
        opening = f"周末我和几个朋友一起去看了电影{rng.choice(FILMS)}，看完以后想说几句。"
    count = rng.randint(6, 8)
    lines = [opening, rng.choice(CONTEXT[topic])]
    for template, aspect, adjective in zip(rng.sample(ASPECT_LINES, count), rng.sample(aspects, count),
                                           rng.sample(good, count), strict=True):
        lines.append(template.format(a=aspect, g=adjective))
    lines.append(rng.choice(VERDICTS[label]))
    return "".join(lines), {"kind": "review", "label": label, "topic": topic, "language": "zh"}


ITEMS = _p("苹果|铅笔|贴纸|贝壳|饼干|邮票|纽扣|橘子|本子|气球")
UNITS = _p("袋|盒|篮|包|箱")
ANTONYMS = _p("高:矮|快:慢|冷:热|大:小|长:短|多:少|早:晚|新:旧|胖:瘦|远:近|深:浅|轻:重|干净:肮脏|安静:吵闹|"
              "勇敢:胆小|简单:复杂|开始:结束|进口:出口|成功:失败|聪明:愚蠢|明亮:黑暗|宽:窄")
# each line template at most twice per answer (as in the English generator)
ANTONYM_LINES = _p("{a}的反义词是{b}。|和{a}意思相反的词是{b}。|{a}的反面可以说{b}。|如果不是{a}，就可能是{b}。|"
                   "{b}正好和{a}相反。")
CAPITAL_LINES = _p("{c}的首都是{k}。|{k}是{c}的首都。|{c}的政府设在{k}。|说到{c}，答案是{k}。|{c}的首都叫作{k}。")
CAPITALS = _p("中国:北京|日本:东京|法国:巴黎|德国:柏林|英国:伦敦|意大利:罗马|西班牙:马德里|俄罗斯:莫斯科|"
              "埃及:开罗|印度:新德里|加拿大:渥太华|巴西:巴西利亚|澳大利亚:堪培拉|韩国:首尔|泰国:曼谷|越南:河内|"
              "希腊:雅典|挪威:奥斯陆|瑞典:斯德哥尔摩|葡萄牙:里斯本")


DIGITS = "零一二三四五六七八九"


def hanzi_number(n: int) -> str:
    """0-999 in Chinese numerals (54 -> 五十四), as prose writes small numbers."""
    if n < 10:
        return DIGITS[n]
    hundreds, rest = divmod(n, 100)
    tens, ones = divmod(rest, 10)
    out = f"{DIGITS[hundreds]}百" if hundreds else ""
    if tens:
        out += ("" if tens == 1 and not hundreds else DIGITS[tens]) + "十"
    elif hundreds and ones:
        out += "零"
    return out + (DIGITS[ones] if ones else "")


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    name, friend = rng.sample(NAMES, 2)
    item, unit = rng.choice(ITEMS), rng.choice(UNITS)
    start, packs, each = rng.randint(12, 60), rng.randint(2, 9), rng.randint(3, 9)
    give = rng.randint(2, start + packs * each - 1)
    total = start + packs * each
    h = hanzi_number
    question = (f"{name}原来有{h(start)}个{item}，后来又买了{h(packs)}{unit}，每{unit}有{h(each)}个，然后送给{friend}"
                f"{h(give)}个。请问{name}现在还有多少个{item}？")
    answer = (f"首先，{name}原来有{h(start)}个{item}。买来的{h(packs)}{unit}一共是{h(packs)}乘以{h(each)}，等于"
              f"{h(packs * each)}个，所以{name}一共有{h(total)}个。送给{friend}{h(give)}个以后，还剩{h(total - give)}个。"
              f"答案是{h(total - give)}个{item}。")
    instruction = rng.choice(["请解答下面的应用题，并写出每一步。", "请一步一步地算出下面这道题的答案。"])
    return instruction, question, answer


def _antonyms(rng: random.Random) -> tuple[str, str, str]:
    pairs = [p.split(":") for p in rng.sample(ANTONYMS, rng.randint(7, 10))]
    templates = rng.sample(ANTONYM_LINES * 2, len(pairs))
    instruction = rng.choice(["请写出下面每个词的反义词。", "请给列表中的每个词找一个意思相反的词。"])
    return instruction, "、".join(a for a, _ in pairs), "".join(t.format(a=a, b=b) for t, (a, b) in zip(templates, pairs, strict=True))


def _capitals(rng: random.Random) -> tuple[str, str, str]:
    pairs = [p.split(":") for p in rng.sample(CAPITALS, rng.randint(7, 10))]
    templates = rng.sample(CAPITAL_LINES * 2, len(pairs))
    instruction = rng.choice(["请说出下面每个国家的首都。", "下面这些国家的首都分别是哪里？"])
    return instruction, "、".join(c for c, _ in pairs), "".join(t.format(c=c, k=k) for t, (c, k) in zip(templates, pairs, strict=True))


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "arithmetic": _arithmetic, "antonyms": _antonyms, "capitals": _capitals,
}


def instruction(rng: random.Random) -> Record:
    """An instruction/answer pair; meta holds instruction, input and output separately for SFT."""
    family = rng.choice(tuple(FAMILIES))
    instr, given, output = FAMILIES[family](rng)
    text = f"指令：{instr}\n输入：{given}\n回答：{output}"
    return text, {"kind": "instruction", "family": family, "instruction": instr, "input": given, "output": output,
                  "language": "zh"}


GENERATORS: dict[str, Callable[[random.Random], Record]] = {"story": story, "review": review, "instruction": instruction}

SPAM = _p("厂家直销，全场一折起，点击链接立即抢购！|加微信领取免费红包，名额有限先到先得！|"
          "日赚五千元不是梦，在家动动手指就能赚钱！")
BOILERPLATE = ("首页 | 新闻 | 产品中心 | 关于我们 | 联系我们 | 登录 | 注册",
               "版权所有 © {year} 某某网络科技有限公司 保留所有权利\n京ICP备12345678号 | 隐私政策 | 网站地图",
               "本网站使用Cookie来改善您的浏览体验。继续浏览即表示您同意我们使用Cookie。\n接受 | 拒绝 | 设置",
               "分享到：微信 | 微博 | QQ空间\n上一篇 | 下一篇 | 返回顶部")
PII_LINES = _p("如有问题请拨打我的手机{mobile}。|我的身份证号码是{id_number}，请帮我核对。|"
               "报名请发邮件到{email}，或者打电话{mobile}。")


def resident_id(rng: random.Random) -> str:
    """A made-up 18-character resident ID number with a valid GB 11643 check character."""
    body = (f"{rng.choice((110105, 310104, 440305, 510107, 330106))}{rng.randint(1950, 2005)}"
            f"{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(0, 999):03d}")
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return body + "10X98765432"[sum(int(d) * w for d, w in zip(body, weights, strict=True)) % 11]


def _pii(rng: random.Random) -> dict[str, str]:
    mobile = f"1{rng.choice('3456789')}{rng.randint(0, 999999999):09d}"
    if rng.random() < 0.5:
        mobile = f"{mobile[:3]}-{mobile[3:7]}-{mobile[7:]}"
    email = f"{rng.choice(('wang', 'li', 'zhang', 'liu', 'chen'))}{rng.randint(10, 99)}@example.cn"
    return {"mobile": mobile, "id_number": resident_id(rng), "email": email}


def _near_duplicate(text: str, rng: random.Random) -> str:
    """Swap one character and add a short sentence: Jaccard over 5-character shingles stays near 0.95."""
    pos = rng.randrange(len(text))
    return text[:pos] + rng.choice("的了和也都") + text[pos + 1:] + rng.choice(("真的。", "确实如此。", "就是这样。"))


def noise(kind: str, rng: random.Random, recent: deque[Record]) -> Record:
    """One noisy Chinese document of ``kind``; copies come from ``recent`` Chinese documents."""
    if kind in ("exact_duplicate", "near_duplicate"):
        text, meta = rng.choice(list(recent))
        return (text if kind == "exact_duplicate" else _near_duplicate(text, rng)), {**meta, "noise": kind}
    if kind == "pii":
        text, meta = GENERATORS[rng.choice(("story", "review"))](rng)
        extra = "".join(line.format(**_pii(rng)) for line in rng.sample(PII_LINES, rng.randint(1, 2)))
        return text + extra, {**meta, "noise": kind}
    tags: dict[str, object] = {"kind": "noise", "noise": kind, "language": "zh"}
    if kind == "repetitive_spam":
        return "\n".join([rng.choice(SPAM)] * rng.randint(8, 20)), tags
    if kind == "boilerplate":
        return "\n".join(b.format(year=rng.randint(2015, 2025)) for b in rng.sample(BOILERPLATE, 2)), tags
    raise ValueError(f"unknown noise kind {kind!r}")
