"""
The builtin arithmetic word problems (nanopipe.tasks.builtin.ArithmeticProblems): GSM8K's exact format, templates
written for this project, `<<expr=result>>` calculator annotations and a final `#### N` line. Each row comes
from one random.Random, so it is a pure function of the generator's seed.

    row = arithmetic_problem(random.Random("Arithmetic/42/0/0"))    # {"question": ..., "answer": ...}
"""

from __future__ import annotations

import random

NAMES = (("Ana", "she"), ("Ben", "he"), ("Chloe", "she"), ("Dev", "he"), ("Elena", "she"), ("Farid", "he"),
         ("Grace", "she"), ("Hiro", "he"), ("Ines", "she"), ("Jamal", "he"), ("Kira", "she"), ("Leo", "he"),
         ("Maya", "she"), ("Noah", "he"), ("Olga", "she"), ("Pablo", "he"), ("Quinn", "they"), ("Rosa", "she"),
         ("Sam", "they"), ("Tariq", "he"), ("Uma", "she"), ("Victor", "he"), ("Wen", "she"), ("Yusuf", "he"))
ITEMS = ("apples", "notebooks", "pencils", "stickers", "muffins", "marbles", "postcards", "candles", "socks",
         "batteries", "cookies", "tickets", "plants", "mugs", "buttons", "comic books")
MACHINES = (("bakery oven", "loaves"), ("printer", "pages"), ("factory robot", "toys"), ("loom", "scarves"),
            ("juice press", "bottles"), ("3D printer", "figurines"))


def _problem_change(rng: random.Random) -> tuple[str, str]:
    (name, pronoun), item = rng.choice(NAMES), rng.choice(ITEMS)
    count, price = rng.randint(2, 12), rng.randint(2, 15)
    cost = count * price
    bill = next(b for b in (20, 50, 100, 200) if b > cost)
    change = bill - cost
    question = (f"{name} buys {count} {item} that cost ${price} each and pays with a ${bill} bill. "
                f"How much change does {name} get back?")
    answer = (f"The {item} cost {count} * ${price} = $<<{count}*{price}={cost}>>{cost} in total.\n"
              f"So the change is ${bill} - ${cost} = $<<{bill}-{cost}={change}>>{change}.\n#### {change}")
    return question, answer


def _problem_rate(rng: random.Random) -> tuple[str, str]:
    machine, things = rng.choice(MACHINES)
    per_hour, hours, days = rng.randint(3, 40), rng.randint(2, 10), rng.randint(2, 7)
    per_day, total = per_hour * hours, per_hour * hours * days
    question = (f"A {machine} makes {per_hour} {things} every hour. It runs {hours} hours a day. "
                f"How many {things} does it make in {days} days?")
    answer = (f"Each day it makes {per_hour} * {hours} = <<{per_hour}*{hours}={per_day}>>{per_day} {things}.\n"
              f"In {days} days it makes {per_day} * {days} = <<{per_day}*{days}={total}>>{total} {things}.\n"
              f"#### {total}")
    return question, answer


def _problem_sharing(rng: random.Random) -> tuple[str, str]:
    (name, pronoun), item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each = rng.randint(2, 8), rng.randint(2, 12)
    kept = rng.randint(1, 10)
    boxes = rng.randint(2, 6)
    total = friends * each + kept
    # pick a per-box count that makes the total exact; otherwise describe loose items
    if total % boxes == 0:
        per_box = total // boxes
        setup = f"{name} has {boxes} boxes with {per_box} {item} in each box."
        first = f"{name} has {boxes} * {per_box} = <<{boxes}*{per_box}={total}>>{total} {item}."
    else:
        setup = f"{name} has {total} {item}."
        first = f"{name} starts with {total} {item}."
    shared = total - kept
    question = (f"{setup} {pronoun.capitalize()} {'keep' if pronoun == 'they' else 'keeps'} {kept} and shares "
                f"the rest equally among {friends} friends. How many {item} does each friend get?")
    answer = (f"{first}\nAfter keeping {kept}, {total} - {kept} = <<{total}-{kept}={shared}>>{shared} {item} "
              f"are shared.\nEach friend gets {shared} / {friends} = <<{shared}/{friends}={each}>>{each} {item}.\n"
              f"#### {each}")
    return question, answer


def _problem_reading(rng: random.Random) -> tuple[str, str]:
    name, _ = rng.choice(NAMES)
    monday, fewer = rng.randint(5, 40), rng.randint(1, 9)
    tuesday = 2 * monday
    wednesday = tuesday - fewer
    first_two = monday + tuesday
    total = first_two + wednesday
    question = (f"{name} read {monday} pages on Monday and twice as many on Tuesday. On Wednesday {name} read "
                f"{fewer} pages fewer than on Tuesday. How many pages did {name} read over the three days?")
    answer = (f"On Tuesday {name} read 2 * {monday} = <<2*{monday}={tuesday}>>{tuesday} pages.\n"
              f"On Wednesday {name} read {tuesday} - {fewer} = <<{tuesday}-{fewer}={wednesday}>>{wednesday} pages.\n"
              f"Monday and Tuesday make {monday} + {tuesday} = <<{monday}+{tuesday}={first_two}>>{first_two} pages.\n"
              f"In total {first_two} + {wednesday} = <<{first_two}+{wednesday}={total}>>{total} pages.\n#### {total}")
    return question, answer


def _problem_discount(rng: random.Random) -> tuple[str, str]:
    item = rng.choice(ITEMS).rstrip("s")
    percent = rng.choice((10, 20, 25, 50))
    price = 20 * rng.randint(1, 30)  # a multiple of 20, so every listed percentage gives whole dollars
    discount = price * percent // 100
    sale = price - discount
    question = (f"A {item} normally costs ${price}. This week it is {percent}% off. "
                f"What is the sale price of the {item} in dollars?")
    answer = (f"The discount is {price} * {percent} / 100 = $<<{price}*{percent}/100={discount}>>{discount}.\n"
              f"The sale price is {price} - {discount} = $<<{price}-{discount}={sale}>>{sale}.\n#### {sale}")
    return question, answer


def _problem_ages(rng: random.Random) -> tuple[str, str]:
    (older, _), (younger, _) = rng.sample(NAMES, 2)
    gap, years = rng.randint(2, 15), rng.randint(2, 10)
    future = rng.randint(years + 1, years + 30)
    now = future - years
    older_now = now + gap
    question = (f"{older} is {gap} years older than {younger}. In {years} years {younger} will be {future} years "
                f"old. How old is {older} now?")
    answer = (f"{younger} is {future} - {years} = <<{future}-{years}={now}>>{now} years old now.\n"
              f"So {older} is {now} + {gap} = <<{now}+{gap}={older_now}>>{older_now} years old.\n#### {older_now}")
    return question, answer


def _problem_two_items(rng: random.Random) -> tuple[str, str]:
    (name, _), (first, second) = rng.choice(NAMES), rng.sample(ITEMS, 2)
    a, p, b, q = rng.randint(2, 12), rng.randint(2, 15), rng.randint(2, 12), rng.randint(2, 15)
    cost_a, cost_b = a * p, b * q
    total = cost_a + cost_b
    question = (f"{name} buys {a} {first} at ${p} each and {b} {second} at ${q} each. "
                f"How much does {name} spend in total?")
    answer = (f"The {first} cost {a} * ${p} = $<<{a}*{p}={cost_a}>>{cost_a}.\n"
              f"The {second} cost {b} * ${q} = $<<{b}*{q}={cost_b}>>{cost_b}.\n"
              f"In total {name} spends ${cost_a} + ${cost_b} = $<<{cost_a}+{cost_b}={total}>>{total}.\n#### {total}")
    return question, answer


def _problem_savings(rng: random.Random) -> tuple[str, str]:
    (name, _), item = rng.choice(NAMES), rng.choice(ITEMS)
    weekly, weeks = rng.randint(3, 25), rng.randint(2, 12)
    saved = weekly * weeks
    spent = rng.randint(1, saved - 1)
    left = saved - spent
    question = (f"{name} saves ${weekly} every week for {weeks} weeks, then spends ${spent} on {item}. "
                f"How much money does {name} have left?")
    answer = (f"{name} saves {weekly} * {weeks} = $<<{weekly}*{weeks}={saved}>>{saved}.\n"
              f"After buying the {item}, {name} has {saved} - {spent} = $<<{saved}-{spent}={left}>>{left} left.\n"
              f"#### {left}")
    return question, answer


PROBLEM_KINDS = (_problem_change, _problem_rate, _problem_sharing, _problem_reading, _problem_discount,
                 _problem_ages, _problem_two_items, _problem_savings)


# Harder problems: three or four calculator steps on larger numbers, so that one sampled answer (temperature 1)
# goes wrong often enough for RL to have something to fix even where greedy answers are nearly all right.

def _problem_shopping_change(rng: random.Random) -> tuple[str, str]:
    (name, _), (first, second) = rng.choice(NAMES), rng.sample(ITEMS, 2)
    a, p, b, q = rng.randint(3, 15), rng.randint(4, 25), rng.randint(3, 15), rng.randint(4, 25)
    cost_a, cost_b = a * p, b * q
    total = cost_a + cost_b
    bill = next(b for b in (100, 200, 500, 1000) if b > total)
    change = bill - total
    question = (f"{name} buys {a} {first} at ${p} each and {b} {second} at ${q} each, and pays with a ${bill} "
                f"bill. How much change does {name} get back?")
    answer = (f"The {first} cost {a} * ${p} = $<<{a}*{p}={cost_a}>>{cost_a}.\n"
              f"The {second} cost {b} * ${q} = $<<{b}*{q}={cost_b}>>{cost_b}.\n"
              f"Together ${cost_a} + ${cost_b} = $<<{cost_a}+{cost_b}={total}>>{total}.\n"
              f"The change is ${bill} - ${total} = $<<{bill}-{total}={change}>>{change}.\n#### {change}")
    return question, answer


def _problem_two_discounts(rng: random.Random) -> tuple[str, str]:
    item = rng.choice(ITEMS).rstrip("s")
    first, second = rng.choice((10, 20, 25, 50)), rng.choice((10, 20, 25, 50))
    price = 400 * rng.randint(1, 12)  # a multiple of 400: both discounts of any listed pair are whole dollars
    off_first = price * first // 100
    sale = price - off_first
    off_second = sale * second // 100
    final = sale - off_second
    question = (f"A {item} costs ${price}. It is {first}% off, then another {second}% off the new price. "
                f"What is the final price in dollars?")
    answer = (f"First {price} * {first} / 100 = $<<{price}*{first}/100={off_first}>>{off_first} off.\n"
              f"That leaves {price} - {off_first} = $<<{price}-{off_first}={sale}>>{sale}.\n"
              f"Then {sale} * {second} / 100 = $<<{sale}*{second}/100={off_second}>>{off_second} off.\n"
              f"The final price is {sale} - {off_second} = $<<{sale}-{off_second}={final}>>{final}.\n#### {final}")
    return question, answer


# The count of machines is stated in the first sentence and used only in the last step; small models guess it
# (cpu-small's SFT models solved 7-20 % of these problems, sampled). `restate` opens the answer by restating it:
# cpu-small's SFT then solved 69 % (seed 2). flows/presets.py gives the measurements.
def _problem_team_output(rng: random.Random, restate: bool = False) -> tuple[str, str]:
    machine, things = rng.choice(MACHINES)
    per_hour, hours, days, machines = rng.randint(6, 45), rng.randint(3, 12), rng.randint(2, 9), rng.randint(2, 6)
    per_day, per_machine, total = per_hour * hours, per_hour * hours * days, per_hour * hours * days * machines
    question = (f"A workshop has {machines} machines. Each {machine} makes {per_hour} {things} an hour and runs "
                f"{hours} hours a day. How many {things} do all the machines make in {days} days?")
    restated = f"The workshop has {machines} machines.\n" if restate else ""
    answer = (f"{restated}One machine makes {per_hour} * {hours} = "
              f"<<{per_hour}*{hours}={per_day}>>{per_day} {things} a day.\n"
              f"In {days} days it makes {per_day} * {days} = <<{per_day}*{days}={per_machine}>>{per_machine}.\n"
              f"All {machines} machines make {per_machine} * {machines} = "
              f"<<{per_machine}*{machines}={total}>>{total} {things}.\n#### {total}")
    return question, answer


def _problem_bake_sale(rng: random.Random) -> tuple[str, str]:
    (name, _), item = rng.choice(NAMES), rng.choice(ITEMS)
    sold, price, people = rng.randint(12, 60), rng.randint(2, 9), rng.randint(2, 6)
    income = sold * price
    share = rng.randint(1, income // people - 1)
    costs = income - share * people  # chosen so the money left splits evenly
    left = income - costs
    question = (f"{name}'s club sells {sold} {item} at ${price} each. Supplies cost ${costs}. The {people} club "
                f"members split the money left equally. How many dollars does each member get?")
    answer = (f"The sales bring {sold} * ${price} = $<<{sold}*{price}={income}>>{income}.\n"
              f"After the supplies, {income} - {costs} = $<<{income}-{costs}={left}>>{left} is left.\n"
              f"Each member gets {left} / {people} = $<<{left}/{people}={share}>>{share}.\n#### {share}")
    return question, answer


HARD_PROBLEM_KINDS = (_problem_shopping_change, _problem_two_discounts, _problem_team_output, _problem_bake_sale)

# A sentence with a number the answer does not use, as GSM8K's problems often have: the solver must pick the
# quantities that matter, not copy every number it sees.
DISTRACTORS = ("{name} also has {n} {item} at home.", "Last year {name} had {n} {item}.",
               "The shop is {n} minutes from {name}'s house.", "{name}'s friend owns {n} {item}.")


def _with_distractor(rng: random.Random, question: str) -> str:
    """`question` with an irrelevant sentence before its last sentence."""
    name, _ = rng.choice(NAMES)
    sentence = rng.choice(DISTRACTORS).format(name=name, n=rng.randint(2, 60), item=rng.choice(ITEMS))
    head, _, last = question.rpartition(". ")
    return f"{head}. {sentence} {last}" if head else f"{sentence} {question}"


DISTRACTOR_SHARE = 0.5
HARD_SHARE = 0.5   # of the rows, a harder problem with one or two distracting sentences


def arithmetic_problem(rng: random.Random, hard_share: float = HARD_SHARE, restate_counts: bool = False) -> dict:
    """One GSM8K-format row {"question", "answer"}; DISTRACTOR_SHARE of them carry a distracting number.
    `hard_share` of the rows are then replaced by a harder problem; the draw comes last, so the other rows are
    those the generator gave before the harder kinds existed (and those of any other share). `restate_counts`:
    the workshop's answer opens by restating its count of machines (the same draws, one more line)."""
    question, answer = rng.choice(PROBLEM_KINDS)(rng)
    if rng.random() < DISTRACTOR_SHARE:
        question = _with_distractor(rng, question)
    if rng.random() < hard_share:
        kind = rng.choice(HARD_PROBLEM_KINDS)
        question, answer = kind(rng, restate=True) if restate_counts and kind is _problem_team_output else kind(rng)
        for _ in range(rng.randint(1, 2)):
            question = _with_distractor(rng, question)
    return {"question": question, "answer": answer}
