#!/usr/bin/env python3
"""Generate jpeft's small offline dialogue-summarization sample.

The rows imitate the *format* of DialogSum (fields ``id``, ``dialogue``,
``summary``, ``topic``; ``#Person1#:`` / ``#Person2#:`` turns; short
third-person summaries) but every sentence is composed here from templates
written for this project.  No DialogSum text is used.

Each scenario function draws slot values (items, times, places, prices,
outcomes, ...) and phrasings from a seeded RNG, emits the dialogue turns for
role ``A`` and role ``B``, and returns a summary that states exactly the slots
that were used.  Whoever speaks first becomes ``#Person1#``; the summary uses
the placeholders ``@A`` / ``@B`` which are mapped accordingly.

Validation rows only use slot combinations that never occur in train, and the
``Ctx.h`` phrasing helper reserves its last option for validation, so some
validation phrasings are unseen too.

Usage::

    python train/sample_data/make_sample.py          # rewrites train/validation.jsonl

The output is deterministic: running it again rewrites identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import random

SEED = 20240611
N_TRAIN = 168
N_VAL = 64
HERE = os.path.dirname(os.path.abspath(__file__))

ORD = {"ten": "tenth", "thirty": "thirtieth", "fifty": "fiftieth", "sixty": "sixtieth", "eighty": "eightieth"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


class Ctx:
    """Per-row state: RNG, split, recorded slot values and emitted turns."""

    def __init__(self, rng: random.Random, split: str):
        self.rng = rng
        self.split = split
        self.key: list[tuple[str, str]] = []
        self.turns: list[tuple[str, str]] = []

    def c(self, *opts):
        """Pick a phrasing."""
        return self.rng.choice(opts)

    def h(self, *opts):
        """Pick a phrasing; the last option is only used for validation."""
        if self.split == "train":
            opts = opts[:-1]
        return self.rng.choice(opts)

    def s(self, name, values):
        """Draw a slot value and record it in the row's slot key."""
        v = self.rng.choice(values)
        self.key.append((name, repr(v)))
        return v

    def p(self, prob: float) -> bool:
        return self.rng.random() < prob

    def a(self, text: str):
        self.turns.append(("A", text))

    def b(self, text: str):
        self.turns.append(("B", text))


# --------------------------------------------------------------------------
# Scenarios.  Each returns (summary, topic); summary uses @A / @B.
# --------------------------------------------------------------------------


def restaurant_booking(x: Ctx):
    rest = x.s("rest", ["the Blue Olive", "Casa Verde", "the Harbour Grill", "Little Saigon", "the Copper Pot", "Maple and Rye"])
    size = x.s("size", ["two", "three", "four", "five", "six", "eight"])
    day = x.s("day", DAYS[3:])
    time = x.s("time", ["six thirty", "seven", "seven thirty", "eight", "half past eight"])
    seat = x.s("seat", ["by the window", "on the terrace", "in a quiet corner", "near the fireplace"])
    out = x.s("out", ["ok", "moved", "no_seat"])
    if x.p(0.5):
        x.b(x.h(f"Good evening, {rest}, how can I help you?", f"Hello, you've reached {rest}. What can we do for you?", f"{rest}, this is the front desk speaking."))
        x.a(f"Hi, I'd love a table for {size} this {day}, around {time} if possible.")
    else:
        x.a(x.h(f"Hello, is that {rest}? I want to reserve a table for {size} people on {day} at {time}.", f"Hi there, I'm hoping to book dinner at {rest} for {size}, {day} at {time}.", f"Good afternoon. Do you still take bookings for {day}? We'd be {size}, at about {time}."))
        x.b("Let me just check the book for you.")
    alt = None
    if out == "moved":
        alt = x.s("alt", ["an hour later", "half an hour earlier", "at nine", "at six"])
        x.b(f"I'm afraid {time} is completely full that night. I could offer you a table {alt}.")
        x.a(x.c(f"Alright, {alt} will have to do.", "Fine, we can be flexible. Please put us down for that."))
    else:
        x.b("Yes, there's room at that time.")
    x.a(f"Would it be possible to sit {seat}?")
    if out == "no_seat":
        x.b(f"Sorry, the tables {seat} are all reserved already. You'll be in the main dining room.")
        x.a("That's okay, the food is what matters.")
    else:
        x.b(f"No problem, I've noted a table {seat}.")
    occ = x.s("occ", [None, "an anniversary", "a birthday", "a farewell for a colleague", "a small business dinner"])
    if occ:
        x.a(f"One more thing: it's for {occ}.")
        x.b(x.c("Lovely, I'll let the kitchen know so they can prepare a little dessert.", "Thanks for telling me, I'll write that on the reservation."))
    x.b(x.c("Can I take a contact number?", "Could you leave a phone number in case we need to reach you?"))
    x.a(f"Of course, it's 0{x.rng.randint(7000, 7999)} {x.rng.randint(100000, 999999)}.")
    when = f"{alt}" if alt else f"at {time}"
    s = f"@A books a table for {size} at {rest} on {day} {when}"
    if alt:
        s += f" because {time} is full"
    s += "."
    if out == "no_seat":
        s += f" @A asks to sit {seat}, but those tables are taken."
    else:
        s += f" @B arranges a table {seat}."
    if occ:
        s += f" The dinner is for {occ}."
    return s, "restaurant booking"


def doctor_appointment(x: Ctx):
    sym = x.s("sym", [("a sore throat that won't go away", "a lasting sore throat"), ("pain in my lower back since I moved some boxes", "back pain"),
                      ("headaches almost every afternoon", "regular headaches"), ("an itchy rash on my arm", "a rash"),
                      ("trouble sleeping for weeks", "trouble sleeping"), ("a swollen ankle after football", "a swollen ankle")])
    doc = x.s("doc", ["Dr. Okafor", "Dr. Lindqvist", "Dr. Moreau", "Dr. Banerjee", "Dr. Castillo"])
    out = x.s("out", ["booked", "today", "other_doc"])
    day = x.s("day", DAYS[:5])
    slot = x.s("slot", ["nine fifteen", "ten forty", "two o'clock", "half past three", "ten past four"])
    x.b(x.h("Riverside Health Centre, reception speaking.", "Good morning, surgery, how can I help?", "Hello, this is the clinic. Are you calling for an appointment?"))
    x.a(f"Hello. I'd like to see {doc}, please. I've had {sym[0]}.")
    x.b(x.c("How long has it been going on?", "I see. Is it getting worse?"))
    x.a(x.c("A few days now, and it isn't improving.", "It comes and goes, but it's been bothering me a lot."))
    if out == "booked":
        x.b(f"{doc} has a free slot on {day} at {slot}. Would that suit you?")
        x.a("Yes, that's perfect.")
        s = f"@A calls the clinic about {sym[1]} and gets an appointment with {doc} on {day} at {slot}."
    elif out == "today":
        x.b(f"{doc} is busy this week, but since it's bothering you, we have an emergency slot today at {slot} with the duty doctor.")
        x.a("I'll take it, thank you.")
        s = f"@A wants to see {doc} about {sym[1]}. {doc} is busy, so @B books @A an emergency slot with the duty doctor today at {slot}."
    else:
        x.b(f"{doc} is on leave until next month. Dr. Hale could see you on {day} at {slot}.")
        x.a(x.c("I'd rather not wait, so Dr. Hale is fine.", "Okay, I'll see Dr. Hale then."))
        s = f"@A asks for an appointment with {doc} about {sym[1]}. {doc} is on leave, so @A agrees to see Dr. Hale on {day} at {slot}."
    x.b(x.c("Please bring your health card and arrive ten minutes early.", "Remember to bring a list of any medicine you're taking."))
    x.a("Will do. Bye.")
    return s, "doctor's appointment"


def job_interview(x: Ctx):
    job = x.s("job", ["junior accountant", "sales assistant", "warehouse supervisor", "graphic designer", "night-shift nurse", "software tester"])
    years = x.s("years", ["two", "three", "five", "seven"])
    prev = x.s("prev", ["a supermarket chain", "a small design studio", "a regional hospital", "a logistics company", "an insurance firm"])
    strength = x.s("strength", ["organised", "calm under pressure", "good with customers", "quick to learn new tools"])
    ask = x.s("ask", [("training", "what training is offered"), ("hours", "the working hours"), ("salary", "the salary"), ("start", "when the job would start")])
    out = x.s("out", ["second", "next_week", "offer"])
    x.a(x.h(f"Thanks for coming in. You applied for the {job} position, right?", f"Please have a seat. So, you're interested in being our new {job}?", f"Welcome. Let's talk about the {job} role."))
    x.b(f"Yes. I've spent the last {years} years working at {prev}.")
    x.a("What would your former manager say is your biggest strength?")
    x.b(f"Probably that I'm {strength}. {x.c('It came up in every review I had.', 'People often relied on me for that.')}")
    x.a("Good. Do you have any questions for us?")
    q = {"training": "What kind of training do new staff get?", "hours": "What would the working hours be?",
         "salary": "Could you tell me the salary range?", "start": "When would the job begin?"}[ask[0]]
    ans = {"training": "There's a two-week induction and a mentor for the first months.", "hours": "Mostly eight to four, with one late shift a week.",
           "salary": "It depends on experience, but it's competitive for the area.", "start": "We'd like someone from the first of next month."}[ask[0]]
    x.b(q)
    x.a(ans)
    if out == "second":
        x.a("We'd like to invite you back to meet the team next week.")
        x.b("That would be great, thank you.")
        o = "@A invites @B to a second interview next week."
    elif out == "next_week":
        x.a("We're seeing a few more people, so we'll decide by next week and call you.")
        x.b("Thank you, I look forward to hearing from you.")
        o = "@A will let @B know the decision next week."
    else:
        x.a("To be honest, I've heard enough. We'd like to offer you the job.")
        x.b(x.c("Really? I accept, thank you so much!", "Wow, thank you. I'm happy to accept."))
        o = "@A offers @B the job and @B accepts."
    s = f"@B interviews for the {job} job and has {years} years of experience at {prev}. @B says @B is {strength} and asks about {ask[1]}. {o}"
    return s, "job interview"


def lost_luggage(x: Ctx):
    city = x.s("city", ["Lisbon", "Oslo", "Cairo", "Toronto", "Seoul", "Nairobi", "Lima"])
    bag = x.s("bag", ["a large green suitcase", "a black backpack with a red tag", "a small silver case on wheels", "a brown leather holdall"])
    inside = x.s("inside", ["my laptop charger", "medicine I need every day", "a suit for a wedding", "presents for my family"])
    out = x.s("out", ["next_flight", "unknown", "found"])
    x.a(x.h(f"Excuse me, my bag never came out on the belt. I was on the flight from {city}.", f"Hi, I think my luggage is missing. I just flew in from {city}.", f"Is this where I report a missing bag? I came from {city} this morning."))
    x.b("I'm sorry to hear that. Can you describe it?")
    x.a(f"It's {bag}. And it has {inside} in it, so I really need it.")
    x.b("Let me check the system with your baggage tag number.")
    if out == "next_flight":
        place = x.s("place", ["the Parkview Hotel", "my sister's flat", "the Riverside Inn", "a guesthouse near the harbour"])
        x.b(f"It seems it was left behind in {city}. It'll arrive on the next flight tonight. Where should we deliver it?")
        x.a(f"To {place}, please.")
        x.b("Fine. You should have it by tomorrow morning.")
        o = f"It was left in {city} and will be delivered to {place} after arriving on the next flight."
    elif out == "unknown":
        x.b("I can't find it yet. I'll file a report, and we usually trace bags within forty-eight hours.")
        x.a(x.c("Can I claim for things I have to buy meanwhile?", "What if I need to buy some things in the meantime?"))
        x.b("Yes, keep the receipts and we'll refund reasonable costs.")
        o = "@B can't find it yet, files a report, and tells @A to keep receipts for anything @A has to buy."
    else:
        x.b("Good news: it was put on the wrong belt. It's at carousel seven.")
        x.a(x.c("Oh, what a relief. Thanks!", "Thank goodness. I'll go and get it."))
        o = "@B finds that the bag was put on the wrong carousel."
    s = f"@A's bag, {bag}, is missing after the flight from {city}. {o}"
    return s.replace("containing my", "containing"), "lost luggage"


def renting_flat(x: Ctx):
    kind = x.s("kind", ["a one-bedroom flat", "a studio", "a two-bedroom flat", "a room in a shared house"])
    area = x.s("area", ["near the university", "in the old town", "close to the train station", "by the park"])
    rent = x.s("rent", ["650", "800", "950", "1,100", "1,300"])
    q = x.s("q", ["pets", "bills", "parking", "furniture"])
    yes = x.s("yes", [True, False])
    out = x.s("out", ["viewing", "expensive", "taken"])
    x.a(x.h(f"Hello, I'm calling about the ad for {kind} {area}.", f"Hi, I saw your listing online, {kind} {area}. Is it still available?", f"Good morning. I'm interested in renting {kind} {area}."))
    if out == "taken":
        x.b("I'm sorry, someone signed the lease yesterday.")
        x.a("Oh, that's a shame. Do you have anything similar?")
        x.b("Not at the moment, but I can add you to my list and call when something comes up.")
        x.a("Yes, please do.")
        return f"@A calls about {kind} {area}, but it has already been rented. @B will call @A if something similar comes up.", "renting a flat"
    x.b(f"Yes, it's still free. The rent is {rent} a month.")
    qq = {"pets": ("Are pets allowed? I have a cat.", "pets are allowed", "pets aren't allowed"),
          "bills": ("Are the bills included?", "bills are included", "bills aren't included"),
          "parking": ("Is there anywhere to park a car?", "there is parking", "there is no parking"),
          "furniture": ("Does it come furnished?", "it is furnished", "it is unfurnished")}[q]
    x.a(qq[0])
    x.b(x.c("Yes, that's fine.", "Yes, it does.") if yes else x.c("No, I'm afraid not.", "Unfortunately not."))
    if out == "viewing":
        day = x.s("day", DAYS)
        x.a(f"Could I come and see it on {day}?")
        x.b(x.c(f"{day} works. Shall we say six in the evening?", f"Sure, I can show you around on {day} after work."))
        x.a("Great, see you then.")
        o = f"They arrange a viewing on {day}."
    else:
        x.a(f"Hmm, {rent} a month is more than I can afford, to be honest.")
        x.b("I understand. The price isn't negotiable, sorry.")
        x.a("Then I'll keep looking. Thanks anyway.")
        o = "@A decides it is too expensive."
    s = f"@A asks about {kind} {area} that costs {rent} a month; {qq[1] if yes else qq[2]}. {o}"
    return s, "renting a flat"


def returning_purchase(x: Ctx):
    item = x.s("item", ["a blue jumper", "a kettle", "a pair of running shoes", "a desk lamp", "a phone case", "a set of bed sheets"])
    reason = x.s("reason", [("it's the wrong size", "it is the wrong size"), ("it stopped working after two days", "it stopped working"),
                            ("the colour isn't the same as in the picture", "the colour looks different"), ("there's a scratch on it", "it is scratched"),
                            ("I got two of them as gifts", "@A got two as gifts")])
    receipt = x.s("receipt", [True, False])
    want = x.s("want", ["refund", "exchange"])
    x.b(x.h("Hi, can I help you?", "Hello there, what brings you in?", "Next customer, please."))
    x.a(f"I bought {item} here last week and I'd like to return it. {reason[0][0].upper() + reason[0][1:]}.")
    x.b("Have you still got the receipt?")
    if receipt:
        x.a(x.c("Yes, it's right here.", "Yes, I kept it in the bag."))
        if want == "refund":
            x.b("Would you like a refund or an exchange?")
            x.a("A refund, please.")
            x.b("Sure. The money will be back on your card in a few days.")
            o = "@B gives @A a refund to @A's card."
        else:
            x.b("Would you like your money back, or a replacement?")
            x.a("I'll swap it for another one, please.")
            x.b("Of course, let me get a new one from the back.")
            o = "@A exchanges it for a new one."
    else:
        x.a(x.c("No, I think I threw it away.", "I'm afraid I lost it."))
        x.b("Without a receipt I can only offer store credit.")
        x.a(x.c("Alright, store credit is fine.", "Okay, I suppose that's better than nothing."))
        o = "Because @A has no receipt, @B can only give store credit, and @A accepts."
    s = f"@A returns {item} because {reason[1]}. {o}"
    return s, "returning a purchase"


def asking_directions(x: Ctx):
    dest = x.s("dest", ["the central post office", "the modern art museum", "the bus station", "the city hospital", "the football stadium", "the town hall"])
    route = x.s("route", [("Go straight for two blocks and turn left at the bakery.", "go straight and turn left at the bakery"),
                          ("Cross the bridge and keep the river on your right.", "cross the bridge and follow the river"),
                          ("Take the second right after the traffic lights.", "take the second right after the traffic lights"),
                          ("Walk through the park and it's opposite the main gate.", "walk through the park")])
    mins = x.s("mins", ["five", "ten", "fifteen", "twenty-five"])
    extra = x.s("extra", ["bus", "walk_with", "none"])
    x.a(x.h(f"Sorry to bother you, do you know the way to {dest}?", f"Excuse me, I'm a bit lost. Where is {dest}?", f"Hi, could you point me towards {dest}?"))
    x.b(x.c("Sure.", "Yes, it's not far.")+" "+route[0])
    x.a(x.c("Is it far? How long will it take on foot?", "And how long is the walk?"))
    x.b(f"About {mins} minutes.")
    if extra == "bus":
        num = x.s("num", ["4", "12", "27", "38"])
        x.a("Is there a bus? My feet are tired.")
        x.b(f"The number {num} stops just there and goes right past it.")
        x.a("Perfect, thanks a lot.")
        o = f" @B also mentions the number {num} bus."
    elif extra == "walk_with":
        x.b("Actually, I'm going that way. I can walk with you.")
        x.a("That's very kind of you.")
        o = " @B offers to walk there with @A."
    else:
        x.a("Thanks so much.")
        x.b("You're welcome.")
        o = ""
    return f"@A asks the way to {dest}. @B tells @A to {route[1]}, about {mins} minutes on foot.{o}", "asking directions"


def planning_trip(x: Ctx):
    dest = x.s("dest", ["the mountains", "the coast", "Prague", "a lake cabin", "Edinburgh", "a small Greek island"])
    length = x.s("len", ["a long weekend", "four days", "a whole week"])
    month = x.s("month", ["May", "July", "September", "October", "December"])
    transport = x.s("tr", ["train", "car", "bus", "plane"])
    issue = x.s("issue", ["budget", "activities", "none"])
    x.a(x.h(f"What do you think about going to {dest} in {month}?", f"I've been thinking, we should take a trip to {dest} in {month}.", f"Let's finally plan that holiday. How about {dest} this {month}?"))
    x.b(x.c("I love that idea. How long would we go for?", "Sounds great. For how long?"))
    x.a(f"Maybe {length}.")
    x.b(f"Should we go by {transport}?")
    x.a(x.c("Yes, that's the easiest.", f"Sure, {transport} makes sense."))
    if issue == "budget":
        x.b("My only worry is money. I can't spend a lot this year.")
        x.a("We could stay in a hostel instead of a hotel.")
        x.b("Good, that would help.")
        o = " @B is worried about money, so they agree to stay in a hostel."
    elif issue == "activities":
        act = x.s("act", ["hiking", "visiting museums", "lying on the beach", "trying local food"])
        x.b(f"I'd like to spend most of the time {act}.")
        x.a(x.c("Fine by me, as long as we have one lazy day.", "Okay, but I want one day to just relax."))
        o = f" @B wants to spend most of the time {act}, and @A agrees if they have one lazy day."
    else:
        o = ""
    who = x.s("who", ["A", "B"])
    if who == "A":
        x.a("I'll look up tickets tonight.")
        x.b("Great, send me the prices.")
        o += " @A will check the tickets."
    else:
        x.b("I'll check the tickets tonight and let you know.")
        x.a("Perfect.")
        o += " @B will check the tickets."
    prep = "on" if dest in ("the coast", "a small Greek island") else "in"
    return f"@A and @B plan {length} {prep} {dest} in {month}, travelling by {transport}.{o}", "planning a trip"


def borrowing_book(x: Ctx):
    book = x.s("book", ["a novel about a lighthouse keeper", "a cookbook of Korean recipes", "a guide to birdwatching", "a history of Roman roads", "a statistics textbook"])
    why = x.s("why", [("for my class", "for a class"), ("to read on my trip", "for a trip"), ("because my cousin recommended it", "because a cousin recommended it")])
    by = x.s("by", ["by Friday", "in two weeks", "after my exams"])
    out = x.s("out", ["lend", "lent_out", "condition"])
    x.a(x.h(f"Do you still have {book}? I saw it on your shelf.", f"Could I borrow {book} of yours?", f"Hey, is {book} yours? Would you lend it to me?"))
    x.b("Sure, why do you want it?")
    x.a(f"I need it {why[0]}.")
    if out == "lent_out":
        x.b("Oh no, I lent it to my neighbour last month and haven't got it back.")
        x.a("Never mind, I'll try the library.")
        return f"@A wants to borrow {book} from @B {why[1]}, but @B has lent it to a neighbour, so @A will try the library.", "borrowing a book"
    x.b("When would you give it back?")
    x.a(f"{by[0].upper() + by[1:]}, I promise.")
    if out == "condition":
        x.b("Okay, but it's my sister's, so please keep it clean and don't fold the pages.")
        x.a("Of course, I'll be careful.")
        o = " @B lends it but asks @A to keep it clean because it belongs to @B's sister."
    else:
        x.b(x.c("No problem, take it.", "That's fine. Enjoy it."))
        x.a("Thanks, you're a star.")
        o = " @B lends it to @A."
    return f"@A asks to borrow {book} {why[1]} and promises to return it {by}.{o}", "borrowing a book"


def car_repair(x: Ctx):
    prob = x.s("prob", [("it squeaks every time I brake", "squeaky brakes", "the brake pads are worn"),
                        ("it won't start on cold mornings", "trouble starting", "the battery is weak"),
                        ("the air conditioning only blows warm air", "warm air from the air conditioning", "the coolant gas is low"),
                        ("there's an orange light on the dashboard", "a warning light", "a sensor is faulty"),
                        ("one tyre keeps going flat", "a tyre that keeps going flat", "there is a nail in the tyre")])
    cost = x.s("cost", ["80", "150", "220", "340"])
    ready = x.s("ready", ["this afternoon", "tomorrow morning", "on Thursday"])
    out = x.s("out", ["accept", "think", "cheaper"])
    x.a(x.h(f"Hi, could you look at my car? {prob[0][0].upper() + prob[0][1:]}.", f"Morning. My car has a problem: {prob[0]}.", f"Hello, I booked a check for my car. Basically, {prob[0]}."))
    x.b("Leave it with me a moment and I'll have a look.")
    x.a(x.c("So, what did you find?", "Is it anything serious?"))
    x.b(f"I checked it. {prob[2][0].upper() + prob[2][1:]}. It'll be about {cost} dollars.")
    if out == "accept":
        x.a("Okay, go ahead. When will it be ready?")
        x.b(f"It'll be ready {ready}.")
        o = f"@A agrees, and the car will be ready {ready}."
    elif out == "think":
        x.a("That's more than I expected. Let me think about it and call you.")
        x.b("Sure, but don't leave it too long.")
        o = "@A wants to think about it before deciding."
    else:
        x.a("Is there any cheaper option?")
        x.b("I could use second-hand parts and knock off a bit.")
        x.a("Let's do that. When can I pick it up?")
        x.b(f"Come back {ready}.")
        o = f"@A asks for a cheaper option, and @B offers second-hand parts; the car will be ready {ready}."
    return f"@A brings in the car because of {prob[1]}. @B finds that {prob[2]} and quotes {cost} dollars. {o}", "car repair"


def birthday_party(x: Ctx):
    who = x.s("who", [("Mum", "sixty", "their mum"), ("Grandpa", "eighty", "their grandpa"), ("our little brother", "ten", "their little brother"),
                      ("our flatmate Dana", "thirty", "their flatmate Dana"), ("Aunt Rosa", "fifty", "their Aunt Rosa")])
    venue = x.s("venue", ["the back garden", "a bowling alley", "a pizza restaurant", "our living room"])
    food = x.s("food", ["a chocolate cake", "homemade lasagne", "a barbecue", "a big fruit tart"])
    task = x.s("task", [("invite the guests", "invite the guests"), ("buy the decorations", "buy decorations"), ("make a playlist", "make a playlist")])
    surprise = x.s("surprise", [True, False])
    x.a(x.h(f"{cap(who[0])} turns {who[1]} next month. We should throw a party.", f"Have you thought about {who[0]}'s {ORD[who[1]]} birthday?", f"Can we talk about the party for {who[0]}? It's a big one, {who[1]}."))
    x.b("Definitely. Where should we have it?")
    x.a(f"I was thinking of {venue}.")
    x.b("Good idea. And food?")
    x.a(f"{food[0].upper() + food[1:]}, of course.")
    if surprise:
        x.b("Should it be a surprise?")
        x.a("Yes, let's keep it secret.")
    x.b(f"I can {task[0]}.")
    x.a("Perfect, thanks.")
    o = " They'll keep it a surprise." if surprise else ""
    return f"@A and @B plan a party for {who[2]}, who turns {who[1]}. It will be at {venue} with {food}, and @B will {task[1]}.{o}", "birthday party"


def study_group(x: Ctx):
    subj = x.s("subj", ["chemistry", "economics", "French grammar", "statistics", "world history"])
    day = x.s("day", DAYS[:5])
    place = x.s("place", ["the third floor of the library", "the café by the gym", "my kitchen table", "an empty classroom in block C"])
    plan = x.s("plan", [("go through old exam papers", "go through old exam papers"), ("make flashcards", "make flashcards"), ("each explain one chapter", "explain chapters to each other")])
    twist = x.s("twist", ["late", "friend", "none"])
    x.a(x.h(f"The {subj} exam is on {day}. Want to study together?", f"I'm panicking about {subj}. Shall we form a study group before {day}'s exam?", f"Are you ready for {subj} on {day}? I could use a study partner."))
    x.b(x.c("Yes, please. Where?", "Good idea. Where should we meet?"))
    x.a(f"How about {place}?")
    hour = x.s("hour", ["four", "six", "ten in the morning"])
    x.b("Fine. What time?")
    x.a(f"Let's say {hour}.")
    x.b("And what should we actually do? Last time we just chatted.")
    x.a(f"Let's {plan[0]}.")
    if twist == "late":
        x.b("I have work until five, so I'll be an hour late.")
        x.a("No problem, I'll start without you.")
        o = " @B will arrive an hour late because of work."
    elif twist == "friend":
        x.b("Can Sam join us? He's good at this.")
        x.a("Sure, the more the better.")
        o = " @B's friend Sam will join them."
    else:
        x.b("Sounds like a plan.")
        o = ""
    place_s = place.replace("my kitchen", "@A's kitchen")
    return f"@A and @B will study for the {subj} exam on {day} at {place_s}, starting at {hour}. They'll {plan[1]}.{o}", "study group"


def hotel_checkin(x: Ctx):
    nights = x.s("nights", ["one night", "two nights", "three nights", "five nights"])
    room = x.s("room", ["a double room", "a single room", "a family room", "a twin room"])
    req = x.s("req", ["early", "late", "view", "breakfast"])
    ok = x.s("ok", [True, False])
    floor = x.s("floor", ["second", "fourth", "sixth", "ninth"])
    x.b(x.h("Good afternoon, welcome. Are you checking in?", "Hello and welcome. Do you have a reservation?", "Hi there, checking in today?"))
    x.a(f"Yes, I booked {room} for {nights}.")
    x.b(f"I've found it. You're on the {floor} floor.")
    q = {"early": "It's only eleven, can I go up now?", "late": "Could I check out late on my last day?",
         "view": "Is it possible to get a room with a view of the sea?", "breakfast": "Is breakfast included?"}[req]
    x.a(q)
    if ok:
        ans = {"early": "Yes, the room is already clean, so you can go up.", "late": "Yes, you can stay until two at no extra cost.",
               "view": "You're lucky, I can move you to one facing the sea.", "breakfast": "Yes, it's served from seven to ten."}[req]
        res = {"early": "@A can check in early", "late": "@A can check out late at no extra cost", "view": "@B gives @A a room with a sea view",
               "breakfast": "breakfast is included"}[req]
    else:
        ans = {"early": "I'm sorry, it isn't ready yet. You can leave your bags here.", "late": "We're full that day, so checkout must be at eleven.",
               "view": "Sorry, those are all taken this week.", "breakfast": "No, but it's twelve dollars extra per person."}[req]
        res = {"early": "@A can't check in early but can leave the bags", "late": "@A can't check out late", "view": "no room with a sea view is free",
               "breakfast": "breakfast costs extra"}[req]
    x.b(ans)
    x.a(x.c("Okay, thank you.", "Alright, thanks."))
    if x.p(0.5):
        x.b("Here's your key card. The lift is on your left.")
    return f"@A checks in to {room} for {nights} on the {floor} floor. {res[0].upper() + res[1:] if not res.startswith('@') else res}.", "hotel check-in"


def bank_account(x: Ctx):
    kind = x.s("kind", [("a savings account", "a savings account"), ("an everyday current account", "a current account"),
                        ("a student account", "a student account"), ("a joint account with my partner", "a joint account with @A's partner")])
    docs = x.s("docs", ["both", "no_address"])
    q = x.s("q", [("Is there a monthly fee?", "Only if your balance drops below five hundred.", "the monthly fee"),
                  ("Can I use it online?", "Yes, there's an app and online banking.", "online banking"),
                  ("What's the interest rate?", "Two percent a year at the moment.", "the interest rate")])
    card = x.s("card", ["five working days", "a week", "ten days"])
    x.a(x.h(f"Hello, I'd like to open {kind[0]}.", f"Good morning. I'm here to set up {kind[0]}.", f"Hi, can I open {kind[0]} today?"))
    x.b("Certainly. Have you brought your passport and proof of address?")
    if docs == "both":
        x.a("Yes, here's my passport and a recent electricity bill.")
        x.b("Thank you, that's all we need.")
        x.a(q[0])
        x.b(q[1])
        x.a("And when do I get my card?")
        x.b(f"It'll come by post within {card}.")
        o = f" @A asks about {q[2]}, and the card will arrive within {card}."
    else:
        x.a("I've got my passport, but I forgot the proof of address.")
        x.b("Then I can't finish today. Please come back with a utility bill or a rental contract.")
        x.a(x.c("Okay, I'll bring it tomorrow.", "Right, I'll come back later this week."))
        o = " @A has forgotten proof of address, so @B asks @A to come back with it."
    return f"@A wants to open {kind[1]} at the bank.{o}", "bank account"


def phone_plan(x: Ctx):
    issue = x.s("issue", [("I keep running out of data", "keeps running out of data"), ("I think I'm paying too much", "thinks @A pays too much"),
                          ("I travel abroad a lot", "often travels abroad")])
    plan = x.s("plan", [("twenty gigabytes", "15"), ("unlimited data", "30"), ("ten gigabytes with free roaming", "22"), ("five gigabytes", "9")])
    out = x.s("out", ["switch", "keep", "think"])
    x.a(x.h(f"Hi, I want to change my phone plan. {issue[0][0].upper() + issue[0][1:]}.", f"Hello, I'm not happy with my mobile plan because {issue[0]}.", f"Could you help me with my contract? {issue[0][0].upper() + issue[0][1:]}."))
    x.b(x.c("Let me look at your usage.", "Sure, let me check your account."))
    x.a("What would you suggest?")
    x.b(f"There's a plan with {plan[0]} for {plan[1]} dollars a month.")
    if out == "switch":
        x.a("That sounds good. Let's switch.")
        x.b("Done. It starts from your next bill.")
        o = "@A switches to it from the next bill."
    elif out == "keep":
        x.a("Hmm, then I'll just keep what I have.")
        x.b("That's fine, nothing changes then.")
        o = "@A decides to keep the current plan."
    else:
        x.a("Can I think about it?")
        x.b("Of course. The offer is valid until the end of the month.")
        o = "@A will think about it; the offer lasts until the end of the month."
    return f"@A {issue[1]} and wants a new phone plan. @B suggests {plan[0]} for {plan[1]} dollars a month. {o}", "phone plan"


def weather_chat(x: Ctx):
    now = x.s("now", [("pouring with rain", "rainy"), ("really hot", "hot"), ("so foggy", "foggy"), ("very windy", "windy"), ("snowing", "snowy")])
    fc = x.s("fc", [("clear up by the weekend", "will clear up by the weekend"), ("get worse tomorrow", "will get worse tomorrow"), ("stay like this all week", "will stay the same all week")])
    plan = x.s("plan", [("cycle to work", "cycling to work"), ("have a picnic on Sunday", "a Sunday picnic"), ("dry my laundry outside", "drying laundry outside"), ("watch my son's football match", "watching @A's son's football match")])
    x.a(x.h(f"Can you believe this weather? It's {now[0]}.", f"Morning! It's {now[0]} again.", f"Have you been outside? It's {now[0]}."))
    x.b(f"I know. The radio said it'll {fc[0]}.")
    x.a(f"That's annoying. I wanted to {plan[0]}.")
    good = fc[0].startswith("clear")
    if good:
        x.b("Well, at least it should be better soon.")
        x.a("True, I'll wait and see.")
        o = ""
    else:
        x.b("Maybe you should change your plans.")
        x.a(x.c("Yes, I'll probably put it off.", "I guess I'll have to."))
        o = " @A will probably postpone it."
    coffee = x.s("coffee", [True, False])
    if coffee:
        x.b("Do you want to come in for a coffee until it calms down?")
        x.a(x.c("Oh, I'd love that.", "Why not, thanks."))
        o += " @B invites @A in for a coffee."
    else:
        x.b(x.c("Anyway, see you later.", "Well, I'd better get going. Bye!"))
    return f"@A and @B talk about the {now[1]} weather. The forecast says it {fc[1]}, which affects @A's plan of {plan[1]}.{o}", "weather small talk"


def moving_house(x: Ctx):
    when = x.s("when", ["this Saturday", "next Sunday", "the last weekend of the month"])
    to = x.s("to", ["a flat across town", "a house near my new job", "a smaller place by the sea", "my parents' old house"])
    help_ = x.s("help", [("carry the heavy boxes", "carry boxes"), ("drive the van", "drive the van"), ("pack up the kitchen", "pack the kitchen")])
    reward = x.s("reward", ["pizza", "dinner at my new place", "a crate of beer"])
    ans = x.s("ans", ["yes", "morning_only", "no"])
    x.a(x.h(f"I'm moving {when}. Any chance you could help?", f"Guess what, I finally found somewhere! I'm moving to {to} {when}.", f"Are you free {when}? I need a hand with my move."))
    x.b("Where are you moving?" if not x.turns[0][1].startswith("Guess") else "Congratulations! Do you need help?")
    x.a(f"To {to}. Could you {help_[0]}?" if not x.turns[0][1].startswith("Guess") else f"Yes, could you {help_[0]}?")
    if ans == "yes":
        x.b("Sure, count me in.")
        o = f"@B agrees to {help_[1]}."
    elif ans == "morning_only":
        x.b("I can only help in the morning; I'm working after lunch.")
        o = f"@B can {help_[1]} only in the morning."
    else:
        x.b("Sorry, I'll be away that weekend.")
        o = "@B can't help because @B will be away."
    x.a(f"I'll get you {reward} as a thank you." if ans != "no" else "No worries, I'll ask someone else.")
    if ans != "no":
        o += f" @A will give @B {reward.replace('my new', '@A' + chr(39) + 's new')} as thanks."
    to_s = to.replace("my new", "@A's new").replace("my parents'", "@A's parents'")
    return f"@A is moving to {to_s} {when} and asks @B for help. {o}", "moving house"


def gym_membership(x: Ctx):
    goal = x.s("goal", [("lose some weight", "lose weight"), ("train for a half marathon", "train for a half marathon"), ("get stronger after a knee injury", "get stronger after a knee injury"), ("swim more often", "swim more")])
    plan = x.s("plan", [("a monthly pass", "35"), ("an annual pass", "300"), ("an off-peak pass", "20")])
    cls = x.s("cls", ["yoga", "spinning", "pilates", "boxing"])
    out = x.s("out", ["join", "trial"])
    x.a(x.h(f"Hi, I'm thinking of joining. I want to {goal[0]}.", f"Hello, could you tell me about memberships? I'd like to {goal[0]}.", f"Good morning. What passes do you have? My goal is to {goal[0]}."))
    x.b(f"We have {plan[0]} for {plan[1]} dollars. It includes a free session with a trainer.")
    x.a("Are classes included too?")
    x.b(f"Yes, for example {cls} three times a week.")
    if out == "join":
        x.a("Great, I'll sign up today.")
        x.b("Wonderful, I just need your ID.")
        o = "@A signs up."
    else:
        x.a("Can I try it before I decide?")
        x.b("Sure, here's a free day pass.")
        o = "@A takes a free day pass to try it first."
    return f"@A wants to {goal[1]} and asks about the gym. @B offers {plan[0]} for {plan[1]} dollars with {cls} classes included. {o}", "gym membership"


def cooking_dinner(x: Ctx):
    dish = x.s("dish", ["vegetable curry", "spaghetti with meatballs", "grilled fish with rice", "mushroom risotto", "chicken soup"])
    miss = x.s("miss", ["onions", "rice", "lemons", "garlic", "cream"])
    guests = x.s("guests", [None, ("my parents", "@A's parents"), ("two friends from work", "two of @A's friends from work")])
    shop = x.s("shop", ["A", "B"])
    x.a(x.h(f"What shall we cook tonight? I fancy {dish}. I haven't had it in ages.", f"How about {dish} for dinner?", f"I'm starving. Let's make {dish}."))
    x.b(x.c("Good idea, but do we have everything?", "Fine, let me check the fridge."))
    x.a(f"Hmm, we're out of {miss}.")
    if shop == "A":
        x.b("Could you pop to the shop?")
        x.a("Okay, I'll go now.")
        o = f"@A will go and buy {miss}."
    else:
        x.b(f"I'll run to the shop and get some {miss}.")
        x.a("Thanks, I'll start chopping.")
        o = f"@B will buy {miss}."
    if guests:
        x.a(f"Oh, and {guests[0]} are coming, so let's make extra.")
        x.b("Then I'll make a salad as well.")
        o += f" {cap(guests[1])} are joining, so @B will also make a salad."
    if x.p(0.5):
        x.b("What about dessert?")
        x.a(x.c("There's ice cream in the freezer.", "Let's keep it simple, just fruit."))
    return f"@A and @B decide to cook {dish} but have no {miss}. {o}", "cooking dinner"


def exam_results(x: Ctx):
    subj = x.s("subj", ["maths", "biology", "history", "English literature", "physics"])
    grade = x.s("grade", ["A", "B", "C", "fail"])
    x.b(x.h("So, did you get your results?", "The results are out! How did you do?", "Don't keep me waiting, what did you get?"))
    x.a(f"I just checked my {subj} result. " + x.c("I was too nervous to open the email for an hour.", "My hands were shaking when I logged in.", "I almost didn't want to look."))
    if grade == "fail":
        x.b("And?")
        x.a("I failed. I'm so disappointed.")
        x.b("I'm sorry. Can you retake it?")
        x.a("Yes, in August. I'll study properly this time.")
        x.b("If you want, I can go through the hard topics with you.")
        help_ = x.s("help", [True, False])
        if help_:
            x.a("Really? That would help a lot.")
            return f"@A failed the {subj} exam and will retake it in August. @B offers to go through the hard topics with @A.", "exam results"
        x.a("Thanks, but I think I'll hire a tutor this time.")
        return f"@A failed the {subj} exam and will retake it in August with a tutor.", "exam results"
        return f"@A failed the {subj} exam and will retake it in August.", "exam results"
    x.b("And?")
    art = "an" if grade == "A" else "a"
    x.a(f"I got {art} {grade}!")
    if grade == "A":
        x.b("That's fantastic! All those late nights paid off. We have to celebrate.")
        x.a("Let's go out for dinner tonight.")
        o = "They'll celebrate with dinner tonight."
    elif grade == "B":
        x.b("Well done, that's a solid result.")
        x.a("Thanks, it's enough to get into the advanced course.")
        o = "It's enough for the advanced course."
    else:
        x.b("That's okay, you passed.")
        x.a("True, but I hoped for better. I'll work harder next term.")
        x.b("A pass is a pass. Don't be too hard on yourself.")
        o = "@A hoped for better and will work harder next term."
    return f"@A got {art} {grade} in {subj}. {o}", "exam results"


def concert_tickets(x: Ctx):
    band = x.s("band", ["Neon Harbour", "the Velvet Owls", "Sunday Static", "a jazz quartet from New Orleans", "the city orchestra"])
    venue = x.s("venue", ["the Arena", "the old opera house", "a club downtown", "the open-air stage in the park"])
    price = x.s("price", ["45", "60", "85", "120"])
    seat = x.s("seat", ["standing", "balcony"])
    out = x.s("out", ["buy", "sold_out", "too_pricey"])
    x.a(x.h(f"Did you hear {band} are playing at {venue}?", f"{band[0].upper() + band[1:]} have a show at {venue} next month!", f"Guess who's performing at {venue}: {band}!"))
    x.b("No way! Should we go?")
    x.a(f"Tickets are {price} dollars for {seat}.")
    x.b("How would we get home afterwards?")
    x.a(x.c("There's a late bus that stops right outside.", "We can share a taxi, it's not far."))
    if out == "buy":
        x.b("Let's do it. Can you buy two?")
        x.a("I'm buying them right now.")
        o = "@A buys two tickets."
    elif out == "sold_out":
        x.b("Let me check... oh, the website says they're sold out.")
        x.a("Let's join the waiting list then.")
        o = "The tickets are sold out, so they join the waiting list."
    else:
        x.b(f"{price} dollars? That's too much for me this month.")
        x.a("Fair enough, maybe next time.")
        o = "@B thinks it's too expensive, so they don't go."
    return f"@A tells @B that {band} are playing at {venue}; {seat} tickets cost {price} dollars. {o}", "concert tickets"


def pet_care(x: Ctx):
    pet = x.s("pet", [("my cat", "@A's cat"), ("our two goldfish", "@A's two goldfish"), ("my old dog", "@A's old dog"), ("the rabbit", "@A's rabbit"), ("my parrot", "@A's parrot")])
    dur = x.s("dur", ["the weekend", "four days", "a week"])
    instr = x.s("instr", [("feed them twice a day", "feed them twice a day"), ("give a pill with breakfast", "give a pill with breakfast"), ("change the water every day", "change the water daily")])
    key = x.s("key", [("under the mat", "under the mat"), ("with the neighbour downstairs", "with the neighbour downstairs")])
    ans = x.s("ans", ["yes", "part"])
    x.a(x.h(f"I'm going away for {dur}. Could you look after {pet[0]}?", f"Can I ask a favour? I need someone to take care of {pet[0]} for {dur}.", f"Would you mind watching {pet[0]} while I'm away for {dur}?"))
    if ans == "yes":
        x.b("Of course. What do I need to do?")
        o = "@B agrees."
    else:
        x.b("I can do the first two days, but then I'm travelling too.")
        x.a("That helps, I'll ask my brother for the rest.")
        x.b("Okay. What do I need to do?")
        o = "@B can only help for the first two days, so @A will ask @A's brother for the rest."
    x.a(f"Just {instr[0]}. The key will be {key[0]}.")
    x.b("Easy enough. Anything else I should know?")
    quirk = x.s("quirk", [None, ("hides under the bed when strangers come", "hides from strangers"), ("hates loud music", "hates loud music")])
    if quirk:
        x.a(f"Only that it {quirk[0]}, so don't worry if you can't see it.")
    else:
        x.a("No, that's everything. Thanks again.")
    return f"@A asks @B to look after {pet[1]} for {dur}. {o} @B must {instr[1]}, and the key will be {key[1]}." + (f" The pet {quirk[1]}." if quirk else ""), "pet care"


def library_fine(x: Ctx):
    item = x.s("item", ["three novels", "a DVD", "a travel guide", "two children's books", "an audiobook"])
    days = x.s("days", ["four", "ten", "twenty"])
    fine = {"four": "two", "ten": "five", "twenty": "ten"}[days]
    reason = x.s("reason", [("I was in hospital", "was in hospital"), ("I honestly forgot", "forgot"), ("I was moving house", "was moving house")])
    out = x.s("out", ["waived", "half", "paid"])
    x.a(x.h(f"Hi, I'm returning {item}. I think they're late.", f"Hello, here's {item}. Sorry, I know they're overdue.", f"I need to bring back {item}, and I'm afraid I'm late."))
    x.b(f"Let me see. Yes, {days} days late. That's a {fine} dollar fine.")
    x.a(f"I'm sorry, {reason[0]}. " + x.c("It completely slipped my mind.", "I meant to come last week.", "Is there anything you can do?"))
    if out == "waived" and reason[1] == "was in hospital":
        x.b("In that case I'll cancel the fine.")
        x.a("Thank you so much.")
        o = "@B cancels the fine."
    elif out in ("half", "waived"):
        x.b("I can take off half, since it's your first time.")
        x.a("That's fair, here you go.")
        o = "@B halves the fine and @A pays."
    else:
        x.b("I understand, but I still have to charge it.")
        x.a("Okay, I'll pay by card.")
        o = "@A pays the fine."
    return f"@A returns {item} {days} days late because @A {reason[1]}. The fine is {fine} dollars. {o}", "library fines"


def haircut(x: Ctx):
    style = x.s("style", [("just a trim", "a trim"), ("a short bob", "a short bob"), ("a fade on the sides", "a fade"), ("a cut and colour", "a cut and colour")])
    day = x.s("day", DAYS[1:])
    time = x.s("time", ["ten", "twelve", "three", "five"])
    out = x.s("out", ["ok", "later"])
    x.b(x.h("Hello, Scissors and Co., how can I help?", "Hi, salon speaking.", "Good afternoon, hair studio, what can I do for you?"))
    x.a(f"I'd like to book {style[0]} on {day}, around {time} if you can.")
    if out == "ok":
        x.b(f"{day} at {time} is free. Any stylist in mind?")
        x.a("Whoever is free is fine.")
        when = f"{day} at {time}"
    else:
        x.b(f"{time} is taken, but I can do an hour later.")
        x.a("That's fine.")
        when = f"{day}, an hour after the time @A wanted"
    x.b("It'll take about forty minutes. Have you been here before?")
    x.a(x.c("Yes, a couple of times last year.", "No, a friend recommended you."))
    if x.p(0.6):
        x.a("How much will it be?")
        x.b(x.c("Around thirty dollars.", "It starts at thirty dollars."))
    return f"@A books {style[1]} at the salon for {when}.", "haircut appointment"


def it_help(x: Ctx):
    prob = x.s("prob", [("I can't connect to the printer", "can't connect to the printer", "reinstalls the printer driver"),
                        ("my laptop has become really slow", "has a very slow laptop", "clears old files and restarts it"),
                        ("I've forgotten my password again", "has forgotten the password", "resets the password"),
                        ("my screen keeps flickering", "has a flickering screen", "replaces the cable")])
    urgent = x.s("urgent", [True, False])
    x.a(x.h(f"Hi, is this IT support? {prob[0][0].upper() + prob[0][1:]}.", f"Hello, sorry to bother you again, but {prob[0]}.", f"Help, {prob[0]}!"))
    x.b(x.c("Okay, let me take a look. When did it start?", "Right. Since when has this been happening?"))
    since = x.s("since", ["this morning", "after yesterday's update", "since I moved desks", "last Friday"])
    x.a(cap(since) + x.c(". I thought it would sort itself out.", ", and I've already tried restarting."))
    if urgent:
        x.a("Please hurry, I have a meeting in twenty minutes.")
        x.b("Don't worry, this is quick.")
    x.b(x.c("Right, done. Try now.", "There we go. Does it work now?"))
    x.a(x.c("Yes, perfect. Thanks!", "It works. You're a lifesaver."))
    u = " before @A's meeting" if urgent else ""
    since_s = since.replace("since I moved", "since @A moved")
    return f"@A {prob[1]}, {since_s if since_s.startswith('since') else 'since ' + since_s}. @B {prob[2]} and fixes the problem{u}.", "computer problem"


def train_ticket(x: Ctx):
    city = x.s("city", ["Leeds", "Bristol", "York", "Glasgow", "Cardiff", "Norwich"])
    kind = x.s("kind", ["single", "return"])
    time = x.s("time", ["8:15", "10:40", "13:05", "17:30"])
    card = x.s("card", [True, False])
    plat = x.s("plat", ["2", "5", "7", "11"])
    price = x.s("price", ["24", "38", "51", "66"])
    x.a(x.h(f"A {kind} to {city}, please.", f"Hi, I need a {kind} ticket to {city}.", f"Can I get a {kind} for {city}?"))
    x.b("When would you like to travel?")
    x.a(f"On the {time} train, please.")
    if card:
        x.b("Do you have a railcard?")
        x.a("Yes, here it is.")
        x.b(f"With the discount it's {price} pounds.")
    else:
        x.b(f"That's {price} pounds.")
    delay = x.s("delay", [None, "ten", "twenty"])
    if delay:
        x.a("Is it running on time?")
        x.b(f"There's a {delay}-minute delay at the moment, I'm afraid.")
    x.a("Which platform does it leave from?")
    x.b(f"Platform {plat}.")
    r = " with a railcard discount" if card else ""
    return f"@A buys a {kind} ticket to {city} for the {time} train for {price} pounds{r}. It leaves from platform {plat}." + (f" The train is {delay} minutes late." if delay else ""), "train ticket"


def noise_complaint(x: Ctx):
    noise = x.s("noise", [("loud music late at night", "loud music at night"), ("your dog barking all day", "@B's dog barking all day"),
                          ("drilling early on Sunday mornings", "drilling early on Sundays"), ("furniture being moved after midnight", "furniture moving after midnight")])
    why = x.s("why", [("we've been renovating", "@B has been renovating"), ("we had friends over for my birthday", "@B had a birthday party"),
                      ("I didn't realise the walls were so thin", "@B didn't realise the walls were thin")])
    prom = x.s("prom", [("keep it quiet after ten", "keep it quiet after ten"), ("warn you before any more work", "warn @A before more work"), ("put rugs on the floor", "put down rugs")])
    x.a(x.h(f"Hi, I live below you. I'm sorry, but there's been {noise[0]}.", f"Excuse me, can we talk about the noise? It's {noise[0]}.", f"Sorry to knock. I haven't been sleeping because of {noise[0]}."))
    x.b(f"Oh, I'm really sorry. {why[0][0].upper() + why[0][1:]}.")
    x.a("I understand, but I have to get up early for work.")
    x.b(f"Of course. From now on I'll {prom[0]}.")
    x.a("Thank you, I appreciate it.")
    return f"@A complains to @B about {noise[1]}. @B apologises, explains that {why[1]}, and promises to {prom[1]}.", "noise complaint"


def buying_gift(x: Ctx):
    who = x.s("who", [("Dad", "their dad"), ("our teacher", "their teacher"), ("Maria, who's retiring", "a retiring colleague"), ("my best friend", "@A's best friend")])
    budget = x.s("budget", ["twenty", "forty", "fifty", "a hundred"])
    idea1 = x.s("idea1", ["a scarf", "a book", "flowers", "a mug"])
    final = x.s("final", ["a nice pen", "a cooking class voucher", "a framed photo", "a plant for the garden"])
    x.a(x.h(f"We need to get something for {who[0]}. Any ideas?", f"What should we buy {who[0]}?", f"I have no idea what to give {who[0]}. Help me?"))
    x.b("How much do we want to spend?")
    x.a(f"Around {budget} dollars.")
    x.b(f"What about {idea1}?")
    x.a(x.c("Too boring, we did that last year.", "Hmm, that feels a bit ordinary."))
    x.b(f"Then {final}?")
    x.a("Perfect, let's get that.")
    x.b(x.c("I'll order it tonight.", "I'll pick it up after work."))
    return f"@A and @B look for a gift for {who[1]} with about {budget} dollars. @A rejects {idea1}, and they choose {final}.", "buying a gift"


def meeting_reschedule(x: Ctx):
    mtg = x.s("mtg", ["the budget review", "the weekly team meeting", "the client presentation", "the project kickoff"])
    orig = x.s("orig", ["Tuesday morning", "Wednesday at two", "Thursday afternoon"])
    why = x.s("why", [("I have a dentist appointment", "has a dentist appointment"), ("the client's flight was delayed", "the client's flight was delayed"), ("the report isn't finished", "the report isn't finished")])
    new = x.s("new", ["Friday at ten", "Monday after lunch", "the same day at five"])
    x.a(x.h(f"Can we move {mtg}? It's set for {orig}.", f"About {mtg} on {orig}, I need to reschedule.", f"Bad news about {orig}: {mtg} has to move."))
    x.b("What happened?")
    x.a(f"{cap(why[0])}.")
    x.b(x.c(f"Hmm, {orig} was the only time everyone could make it.", "That's a pity, it took ages to find a slot."))
    x.a("I know, sorry. Could we find another time?")
    x.b(f"How about {new}?")
    room = x.s("room", [True, False])
    if room:
        x.a("That works. Is the big meeting room free then?")
        x.b("I'm not sure. Could you check and book it?")
        x.a("Sure, and I'll update the calendar invite.")
    else:
        x.a("That works. I'll update the calendar invite and tell the others.")
    w = f"@A {why[1]}" if why[1].startswith("has") else why[1]
    r = " @A will also book the big meeting room." if room else ""
    return f"@A asks @B to move {mtg} from {orig} because {w}. They move it to {new}, and @A will update the invite.{r}", "rescheduling a meeting"


def takeaway_order(x: Ctx):
    food = x.s("food", [("two margherita pizzas", "two margherita pizzas"), ("a large pad thai and spring rolls", "pad thai and spring rolls"), ("three beef burgers with fries", "three burgers with fries"), ("a lamb curry with naan", "a lamb curry with naan")])
    addr = x.s("addr", ["14 Elm Street", "the flat above the pharmacy on Kings Road", "22 Harbour Lane", "Block B of the student halls"])
    wait = x.s("wait", ["twenty", "thirty-five", "fifty"])
    pay = x.s("pay", ["cash", "card"])
    x.b(x.h("Hello, Golden Spoon, delivery or collection?", "Hi, thanks for calling, what would you like?", "Good evening, are you ordering for delivery?"))
    x.a(f"Delivery, please. I'd like {food[0]}.")
    drink = x.s("drink", [None, "two cans of cola", "a bottle of sparkling water", "a mango lassi"])
    x.b("Anything to drink?")
    x.a(f"Yes, {drink}." if drink else "No, that's all, thanks.")
    x.b("What's the address?")
    x.a(f"{addr[0].upper() + addr[1:]}.")
    x.b(f"It'll be about {wait} minutes. Cash or card?")
    x.a(f"{pay.capitalize()}, please.")
    if wait == "fifty":
        x.a("Fifty minutes? Okay, we'll wait.")
    if drink:
        food = (food[0], f"{food[1]} with {drink}")
    return f"@A orders {food[1]} for delivery to {addr}. It will take about {wait} minutes, and @A will pay by {pay}.".replace("pay by cash", "pay in cash"), "ordering takeaway"


SCENARIOS = [
    restaurant_booking, doctor_appointment, job_interview, lost_luggage, renting_flat, returning_purchase,
    asking_directions, planning_trip, borrowing_book, car_repair, birthday_party, study_group, hotel_checkin,
    bank_account, phone_plan, weather_chat, moving_house, gym_membership, cooking_dinner, exam_results,
    concert_tickets, pet_care, library_fine, haircut, it_help, train_ticket, noise_complaint, buying_gift,
    meeting_reschedule, takeaway_order,
]


def render(x: Ctx, summary: str):
    first = x.turns[0][0]
    names = {first: "#Person1#", ("B" if first == "A" else "A"): "#Person2#"}
    lines = []
    for i, (role, text) in enumerate(x.turns):
        if i and role == x.turns[i - 1][0]:  # same speaker again: merge into one turn
            lines[-1] += " " + text
        else:
            lines.append(f"{names[role]}: {text}")
    summary = summary.replace("@A", names["A"]).replace("@B", names["B"])
    return "\n".join(lines), summary, len(lines)


def generate(split: str, n: int, rng: random.Random, banned: set):
    rows, seen = [], set()
    for i in range(n):
        sc = SCENARIOS[i % len(SCENARIOS)]
        for _ in range(1000):
            x = Ctx(rng, split)
            summary, topic = sc(x)
            key = (sc.__name__, tuple(x.key))
            if key in seen or key in banned:
                continue
            dialogue, summary, nturns = render(x, summary)
            nwords = len(dialogue.split())
            if 4 <= nturns <= 12 and 40 <= nwords <= 200:
                break
        else:
            raise RuntimeError(f"could not draw a fresh {split} row for {sc.__name__}")
        seen.add(key)
        rows.append({"dialogue": dialogue, "summary": summary, "topic": topic})
    rng.shuffle(rows)
    return [{"id": f"sample_{split}_{i + 1:04d}", **r} for i, r in enumerate(rows)], seen


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=HERE)
    args = ap.parse_args()
    rng = random.Random(SEED)
    train, train_keys = generate("train", N_TRAIN, rng, set())
    val, _ = generate("validation", N_VAL, rng, train_keys)
    for name, rows in (("train", train), ("validation", val)):
        path = os.path.join(args.out_dir, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
