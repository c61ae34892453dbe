"""Demo data for `summarize`: deterministic multi-speaker dialogues with reference summaries, English and Korean.

Each dialogue is about a schedule, an order or directions. Its key facts (day, time, place, what to bring; dish,
drink, address, price, delivery time; blocks, turn, landmark, walking time) are spread over the turns, and some
dialogues change a fact midway ("Actually, can we make it 4 pm?"), so the summary must track the last value. The
reference summary states every fact in a fixed order. Speakers are tagged as in DialogSum (`#Person1#: ...`), the
format of the seed 001 competition, so the demo also exercises speaker tags registered as special tokens.

Everything is generated from a seed: the same call gives the same rows on every machine, with no download.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable
from pathlib import Path

SPEAKER_TAGS = ("#Person1#", "#Person2#", "#Person3#")

EN = {
    "days": ["Monday", "Tuesday", "Thursday", "Friday"],
    "times": ["9 am", "10:30 am", "1 pm", "2 pm", "3:30 pm", "4 pm", "5 pm"],
    "places": ["the library", "room 204", "the lobby", "the cafe on Main Street", "the park entrance"],
    "topics": ["budget review", "project kickoff", "design meeting", "weekly sync", "sales report"],
    "items": ["the slides", "the contract", "a laptop", "the printed report", "the sample boxes"],
    "dishes": ["pizzas", "chicken burgers", "bowls of noodle soup", "salads", "beef tacos"],
    "counts": ["two", "three", "four", "five"],
    "drinks": ["a large cola", "two lemonades", "an orange juice", "three iced teas"],
    "addresses": ["12 Oak Street", "the Green Tower, floor 3", "45 River Road", "the city hall office"],
    "prices": ["18", "24", "31", "37", "42"],
    "minutes": ["10", "15", "20", "25", "30", "40"],
    "destinations": ["the post office", "the museum", "the central station", "the city hall"],
    "blocks": ["two", "three", "four"],
    "turns": ["left", "right"],
    "landmarks": ["the bank", "the pharmacy", "the big crossroads", "the bus stop"],
    "neighbors": ["a bakery", "a flower shop", "a small park", "a bookstore"],
}
KO = {
    "days": ["월요일", "화요일", "목요일", "금요일"],
    "times": ["오전 9시", "오전 10시 30분", "오후 1시", "오후 2시", "오후 3시 30분", "오후 4시", "오후 5시"],
    "places": ["도서관", "204호 회의실", "로비", "역 앞 카페", "공원 입구"],
    "topics": ["예산 회의", "프로젝트 착수 회의", "디자인 검토", "주간 회의", "영업 보고"],
    "items": ["발표 자료", "계약서", "노트북", "출력한 보고서", "견본 상자"],
    "dishes": ["김치찌개", "불고기 덮밥", "비빔밥", "짜장면", "떡볶이"],
    "counts": ["두 개", "세 개", "네 개", "다섯 개"],
    "drinks": ["콜라 한 병", "사이다 두 병", "식혜 한 병", "주스 세 병"],
    "addresses": ["행복아파트 101동", "한빛빌딩 3층", "강변로 45번지", "시청 별관"],
    "prices": ["18000", "24000", "31000", "37000", "42000"],
    "minutes": ["10", "15", "20", "25", "30", "40"],
    "destinations": ["우체국", "시립 박물관", "중앙역", "시청"],
    "blocks": ["두", "세", "네"],
    "turns": ["왼쪽", "오른쪽"],
    "landmarks": ["은행", "약국", "큰 사거리", "버스 정류장"],
    "neighbors": ["빵집", "꽃집", "작은 공원", "서점"],
}


def _has_batchim(word: str) -> bool:
    """Whether the last syllable of a Korean word ends in a consonant (picks 을/를, 은/는, 이/가, 과/와)."""
    last = word.strip()[-1]
    if "가" <= last <= "힣":
        return (ord(last) - ord("가")) % 28 != 0
    return last in "0136789lmnLMN"  # digits and letters read with a final consonant (일, 삼, 육, 칠, 팔, 구, 십)


def _josa(word: str, with_batchim: str, without: str) -> str:
    return word + (with_batchim if _has_batchim(word) else without)


def _pick(rng: random.Random, values: list[str], avoid: str | None = None) -> str:
    choices = [v for v in values if v != avoid]
    return rng.choice(choices)


def schedule_en(rng: random.Random) -> tuple[list[str], str]:
    """Three speakers agree on a meeting; the time may change midway."""
    v = {k: rng.choice(EN[k]) for k in ("days", "times", "places", "topics", "items")}
    lines = [
        f"#Person1#: Do you both have time for the {v['topics']} this week?",
        f"#Person2#: I'm busy until Wednesday. How about {v['days']}?",
        f"#Person3#: {v['days']} works for me. What time?",
        f"#Person2#: {v['times'].capitalize()} would be best.",
    ]
    if rng.random() < 0.35:
        v["times"] = _pick(rng, EN["times"], v["times"])
        lines.append(f"#Person3#: I have a call then. Can we make it {v['times']}?")
        lines.append("#Person2#: Sure, that's fine.")
    lines += [
        f"#Person1#: Great. Let's meet at {v['places']}.",
        f"#Person3#: Okay. I'll bring {v['items']}.",
    ]
    summary = (
        f"#Person1#, #Person2# and #Person3# will have the {v['topics']} on {v['days']} at {v['times']} at "
        f"{v['places']}. #Person3# will bring {v['items']}."
    )
    return lines, summary


def order_en(rng: random.Random) -> tuple[list[str], str]:
    """A delivery order; the quantity may change midway."""
    v = {k: rng.choice(EN[k]) for k in ("dishes", "counts", "drinks", "addresses", "prices", "minutes")}
    lines = [
        "#Person1#: Hello, I'd like to order some food for delivery.",
        "#Person2#: Sure. What would you like?",
        f"#Person1#: {v['counts'].capitalize()} {v['dishes']}, please.",
    ]
    if rng.random() < 0.35:
        v["counts"] = _pick(rng, EN["counts"], v["counts"])
        lines.append(f"#Person1#: Oh, wait. Make that {v['counts']}, please.")
    lines += [
        "#Person2#: Anything to drink?",
        f"#Person1#: Yes, {v['drinks']}.",
        "#Person2#: Where should we deliver it?",
        f"#Person1#: To {v['addresses']}.",
        f"#Person2#: That's {v['prices']} dollars. It will arrive in {v['minutes']} minutes.",
    ]
    summary = (
        f"#Person1# orders {v['counts']} {v['dishes']} and {v['drinks']} for delivery to {v['addresses']}. "
        f"It costs {v['prices']} dollars and will arrive in {v['minutes']} minutes."
    )
    return lines, summary


def directions_en(rng: random.Random) -> tuple[list[str], str]:
    """Directions to a place, asked by one passer-by and given by another."""
    v = {k: rng.choice(EN[k]) for k in ("destinations", "blocks", "turns", "landmarks", "neighbors", "minutes")}
    lines = [
        f"#Person1#: Excuse me, how do I get to {v['destinations']}?",
        f"#Person2#: Go straight for {v['blocks']} blocks.",
        "#Person1#: And then?",
        f"#Person2#: Turn {v['turns']} at {v['landmarks']}. It's next to {v['neighbors']}.",
        "#Person1#: How long does it take on foot?",
        f"#Person2#: About {v['minutes']} minutes.",
        "#Person1#: Thank you so much!",
    ]
    summary = (
        f"#Person2# tells #Person1# to go straight for {v['blocks']} blocks and turn {v['turns']} at "
        f"{v['landmarks']} to reach {v['destinations']}, next to {v['neighbors']}. It takes about "
        f"{v['minutes']} minutes on foot."
    )
    return lines, summary


def schedule_ko(rng: random.Random) -> tuple[list[str], str]:
    """세 사람이 회의 일정을 정한다; 중간에 시간이 바뀔 수 있다."""
    v = {k: rng.choice(KO[k]) for k in ("days", "times", "places", "topics", "items")}
    lines = [
        f"#Person1#: 이번 주에 {_josa(v['topics'], '을', '를')} 할 시간 있어요?",
        f"#Person2#: 수요일까지는 바빠요. {_josa(v['days'], '은', '는')} 어때요?",
        f"#Person3#: {v['days']} 좋아요. 몇 시가 편해요?",
        f"#Person2#: {_josa(v['times'], '이', '가')} 제일 좋아요.",
    ]
    if rng.random() < 0.35:
        v["times"] = _pick(rng, KO["times"], v["times"])
        lines.append(f"#Person3#: 그때는 통화가 있어요. {_josa(v['times'], '으로', '로')} 바꿀 수 있을까요?")
        lines.append("#Person2#: 네, 괜찮아요.")
    lines += [
        f"#Person1#: 좋아요. 그럼 {v['places']}에서 만나요.",
        f"#Person3#: 네. 제가 {_josa(v['items'], '을', '를')} 가져갈게요.",
    ]
    summary = (
        f"#Person1#, #Person2#, #Person3#는 {v['days']} {v['times']}에 {v['places']}에서 "
        f"{_josa(v['topics'], '을', '를')} 하기로 했다. #Person3#가 {_josa(v['items'], '을', '를')} 가져오기로 했다."
    )
    return lines, summary


def order_ko(rng: random.Random) -> tuple[list[str], str]:
    """배달 주문; 중간에 수량이 바뀔 수 있다."""
    v = {k: rng.choice(KO[k]) for k in ("dishes", "counts", "drinks", "addresses", "prices", "minutes")}
    lines = [
        "#Person1#: 안녕하세요, 배달 주문하려고요.",
        "#Person2#: 네, 뭘 드릴까요?",
        f"#Person1#: {v['dishes']} {v['counts']} 주세요.",
    ]
    if rng.random() < 0.35:
        v["counts"] = _pick(rng, KO["counts"], v["counts"])
        lines.append(f"#Person1#: 아, 잠깐만요. {_josa(v['counts'], '으로', '로')} 해 주세요.")
    lines += [
        "#Person2#: 음료는요?",
        f"#Person1#: {v['drinks']} 주세요.",
        "#Person2#: 어디로 배달해 드릴까요?",
        f"#Person1#: {_josa(v['addresses'], '으로', '로')} 와 주세요.",
        f"#Person2#: {v['prices']}원입니다. {v['minutes']}분 뒤에 도착해요.",
    ]
    summary = (
        f"#Person1#는 {v['dishes']} {v['counts']}와 {_josa(v['drinks'], '을', '를')} "
        f"{_josa(v['addresses'], '으로', '로')} 배달 주문했다. "
        f"가격은 {v['prices']}원이고 {v['minutes']}분 뒤에 도착한다."
    )
    return lines, summary


def directions_ko(rng: random.Random) -> tuple[list[str], str]:
    """길 안내: 한 사람이 묻고 다른 사람이 알려 준다."""
    v = {k: rng.choice(KO[k]) for k in ("destinations", "blocks", "turns", "landmarks", "neighbors", "minutes")}
    lines = [
        f"#Person1#: 실례합니다, {_josa(v['destinations'], '은', '는')} 어떻게 가요?",
        f"#Person2#: {v['blocks']} 블록 직진하세요.",
        "#Person1#: 그다음에는요?",
        f"#Person2#: {v['landmarks']}에서 {v['turns']}으로 도세요. {v['neighbors']} 옆에 있어요.",
        "#Person1#: 걸어서 얼마나 걸려요?",
        f"#Person2#: {v['minutes']}분쯤 걸려요.",
        "#Person1#: 정말 감사합니다!",
    ]
    summary = (
        f"#Person2#는 #Person1#에게 {v['blocks']} 블록 직진한 뒤 {v['landmarks']}에서 {v['turns']}으로 돌면 "
        f"{v['neighbors']} 옆에 {_josa(v['destinations'], '이', '가')} 있다고 알려 주었다. 걸어서 "
        f"{v['minutes']}분쯤 걸린다."
    )
    return lines, summary


GENERATORS: dict[str, list[Callable[[random.Random], tuple[list[str], str]]]] = {
    "en": [schedule_en, order_en, directions_en],
    "ko": [schedule_ko, order_ko, directions_ko],
}


def make_dialogues(n: int, seed: int, languages: tuple[str, ...] = ("en", "ko")) -> list[dict[str, str]]:
    """`n` rows {id, dialogue, summary}: languages and topics in turn, slot values from a seeded RNG."""
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        language = languages[index % len(languages)]
        kinds = GENERATORS[language]
        lines, summary = kinds[(index // len(languages)) % len(kinds)](rng)
        rows.append({"id": f"{language}-{seed}-{index:04d}", "dialogue": "\n".join(lines), "summary": summary})
    return rows


def write_demo_summarize_data(
    folder: str | Path, n_train: int = 240, n_valid: int = 24, n_test: int = 12
) -> dict[str, Path]:
    """Write train.csv, valid.csv (id, dialogue, summary) and test.csv (id, dialogue) into `folder`.

    The three splits use different seeds, so no dialogue of valid or test is a copy of a training one (slot
    combinations may coincide, as in real data)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": make_dialogues(n_train, 1),
        "valid": make_dialogues(n_valid, 2),
        "test": make_dialogues(n_test, 3),
    }
    paths = {}
    for name, rows in splits.items():
        path = folder / f"{name}.csv"
        columns = ["id", "dialogue"] if name == "test" else ["id", "dialogue", "summary"]
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(path)
        paths[name] = path
    return paths
