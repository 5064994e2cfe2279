"""Write the demo's synthetic medical Q&A chat set, data/demo/medical_qa.jsonl (a maintenance tool, not a stage).

    python scripts/tools/make_demo_data.py                      # rewrites data/demo/medical_qa.jsonl
    python scripts/tools/make_demo_data.py --output /tmp/qa.jsonl

Each row is one conversation: {"messages": [system, user, assistant]}. The rows come from templates: a few dozen
common conditions, three facts about each (typical symptoms, first-line care, when to see a doctor), and three
phrasings of each question. The output is deterministic (a fixed seed picks the phrasings), so the file in git is
exactly what this script writes. The content is short and plainly educational; it is synthetic and not medical
advice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.io.cli import cli, log
from hpc_finetune.io.files import write_jsonl

DEFAULT_OUTPUT = str(Path(__file__).resolve().parents[2] / "data" / "demo" / "medical_qa.jsonl")

SYSTEM = "You are a medical information assistant. Answer briefly in plain language. This is education, not medical advice."

# (name as used mid-sentence, what it usually causes, first-line care, when to see a doctor). A `when` that starts
# with a capital letter is a whole sentence of its own (for emergencies) instead of "See a doctor if ...".
CONDITIONS: list[tuple[str, str, str, str]] = [
    (
        "a common cold",
        "a runny nose, a sore throat and sneezing",
        "rest, fluids and simple pain relief",
        "it lasts over three weeks or you struggle to breathe",
    ),
    (
        "the flu",
        "a sudden fever, aches, tiredness and a dry cough",
        "rest, fluids and fever reducers",
        "you have trouble breathing or chest pain",
    ),
    (
        "strep throat",
        "a sore throat, fever and swollen neck glands",
        "an antibiotic after a positive throat test",
        "you have a sore throat with a high fever",
    ),
    (
        "sinusitis",
        "facial pressure, a blocked nose and thick mucus",
        "saline nose rinses, pain relief and rest",
        "it lasts over ten days or the skin around the eyes swells",
    ),
    (
        "asthma",
        "wheezing, breathlessness and a cough at night",
        "a reliever inhaler and, if needed, a daily preventer inhaler",
        "Get emergency help if the reliever inhaler does not help.",
    ),
    (
        "pneumonia",
        "a cough with phlegm, fever and fast breathing",
        "antibiotics, rest and fluids",
        "Get urgent care if breathing is hard or you feel confused.",
    ),
    (
        "high blood pressure",
        "no symptoms, so regular checks matter",
        "less salt, exercise and, if needed, medicine",
        "a reading is very high or you have chest pain",
    ),
    (
        "type 2 diabetes",
        "thirst, frequent urination and tiredness",
        "healthy eating, exercise and often metformin",
        "you have these symptoms or very high sugar readings",
    ),
    (
        "low blood sugar",
        "shaking, sweating, hunger and confusion",
        "fifteen grams of fast sugar, then a recheck",
        "Call emergency services if the person becomes unconscious.",
    ),
    (
        "a migraine",
        "a throbbing one-sided headache with nausea",
        "rest in a dark room and early pain relief",
        "the headache is sudden and severe or follows a head injury",
    ),
    (
        "acid reflux",
        "a burning chest after meals and a sour taste",
        "smaller meals, no late eating and antacids",
        "swallowing is hard or you lose weight",
    ),
    (
        "gastroenteritis",
        "diarrhea, vomiting and stomach cramps",
        "small sips of water or rehydration solution",
        "you cannot keep fluids down or see blood in the stool",
    ),
    (
        "a urinary tract infection",
        "burning urine and needing to go often",
        "a short course of antibiotics and plenty of water",
        "you have a fever or back pain, or you are pregnant",
    ),
    (
        "a kidney stone",
        "severe pain in the side that spreads to the groin",
        "pain relief and plenty of water",
        "the pain is severe or you have a fever",
    ),
    (
        "eczema",
        "dry, itchy, red patches of skin",
        "daily moisturizer and a steroid cream for flares",
        "the skin is weeping, crusted or painful",
    ),
    (
        "hay fever",
        "sneezing, a runny nose and itchy eyes",
        "avoiding pollen and a non-drowsy antihistamine",
        "medicines do not help or you start to wheeze",
    ),
    (
        "anaphylaxis",
        "throat swelling, trouble breathing and hives",
        "an adrenaline auto-injector at once",
        "It is always an emergency: call emergency services.",
    ),
    (
        "iron deficiency anemia",
        "tiredness, pale skin and breathlessness",
        "iron-rich foods and iron tablets",
        "you feel very tired or have heavy bleeding",
    ),
    (
        "osteoarthritis",
        "stiff, painful joints that are worse after use",
        "exercise, weight loss and pain relief",
        "a joint is hot, red and swollen",
    ),
    (
        "gout",
        "sudden severe pain and swelling in the big toe",
        "anti-inflammatory medicine, rest and ice",
        "it is your first attack or you have a fever",
    ),
    (
        "lower back pain",
        "aching and stiffness in the lower back",
        "staying active, heat and pain relief",
        "you have leg weakness or numbness in the groin",
    ),
    (
        "a sprained ankle",
        "pain, swelling and bruising after a twist",
        "rest, ice, compression and elevation",
        "you cannot put any weight on it",
    ),
    (
        "conjunctivitis",
        "a red, itchy eye with a sticky discharge",
        "cleaning the eyelids with cooled boiled water",
        "you have eye pain or blurred vision",
    ),
    (
        "an ear infection",
        "ear pain, fever and muffled hearing",
        "pain relief, as most clear up within three days",
        "it lasts over three days or fluid leaks from the ear",
    ),
    (
        "depression",
        "low mood and loss of interest for two weeks or more",
        "talking therapy, activity and sometimes medicine",
        "low mood lasts over two weeks, and the same day if you feel unsafe",
    ),
    (
        "insomnia",
        "trouble falling or staying asleep",
        "a regular sleep schedule and less caffeine",
        "it lasts over three months or affects your day",
    ),
    (
        "dehydration",
        "thirst, dark urine and dizziness",
        "water or rehydration solution in small sips",
        "you are confused or pass no urine for eight hours",
    ),
    (
        "shingles",
        "a painful, blistering rash on one side of the body",
        "antiviral medicine started within three days",
        "you think you have it, and urgently if the rash is near the eye",
    ),
    (
        "a minor burn",
        "red, painful skin and sometimes blisters",
        "cool running water for twenty minutes",
        "the burn is larger than your hand or on the face",
    ),
    (
        "a concussion",
        "a headache, dizziness and confusion after a blow to the head",
        "rest and a gradual return to activity",
        "Get urgent care if vomiting repeats or drowsiness grows.",
    ),
]

QUESTIONS = {
    "symptoms": [
        "What are the symptoms of {name}?",
        "How can I tell if I have {name}?",
        "What are the signs of {name}?",
        "What does {name} usually feel like?",
    ],
    "care": [
        "How is {name} treated?",
        "What is the first-line treatment for {name}?",
        "What helps with {name}?",
        "What can I do about {name}?",
    ],
    "doctor": [
        "When should I see a doctor about {name}?",
        "When does {name} need medical care?",
        "Is {name} serious enough to see a doctor?",
        "When should I worry about {name}?",
    ],
}


def answer(kind: str, symptoms: str, care: str, when: str) -> str:
    """The reply to a question of this kind. It does not repeat the condition's name: the question has it."""
    if kind == "symptoms":
        return f"It usually causes {symptoms}."
    if kind == "care":
        return f"First-line care is {care}."
    return when if when[0].isupper() else f"See a doctor if {when}."


def make_rows(seed: int = 0, phrasings: int = 3) -> list[dict]:
    """The conversations, in a fixed order: condition by condition, fact by fact."""
    rng = random.Random(seed)
    rows = []
    for name, symptoms, care, when in CONDITIONS:
        for kind, templates in QUESTIONS.items():
            reply = answer(kind, symptoms, care, when)
            for template in rng.sample(templates, phrasings):
                question = template.format(name=name)
                rows.append(
                    {
                        "messages": [
                            {"role": "system", "content": SYSTEM},
                            {"role": "user", "content": question},
                            {"role": "assistant", "content": reply},
                        ]
                    }
                )
    return rows


@dataclass
class Config:
    output: str = field(default=DEFAULT_OUTPUT, metadata={"help": "JSON Lines file to write."})
    seed: int = field(default=0, metadata={"help": "Seed that picks the question phrasings."})
    phrasings: int = field(default=3, metadata={"help": "Phrasings per question (1-4)."})


def main(cfg: Config) -> None:
    rows = make_rows(cfg.seed, cfg.phrasings)
    write_jsonl(cfg.output, rows)
    log.info("wrote %d conversations about %d conditions to %s", len(rows), len(CONDITIONS), cfg.output)


if __name__ == "__main__":
    cli(main, Config, __doc__)
