"""The tasks of the built-in demo model (models/demo-llama) and its adapters.

One prompt format is shared by the base model and every adapter::

    "<input>\\n=>"            e.g. "green apple river\\n=>"

and the completion is a space, the answer, then EOS. An input is 2-5 distinct
lowercase words. What comes back depends on the adapter:

| adapter_name | task                      | "green apple river" ->            |
|--------------|---------------------------|-----------------------------------|
| (none)       | base model: echo          | green apple river                 |
| upper        | uppercase                 | GREEN APPLE RIVER                 |
| reverse      | reverse the word order    | river apple green                 |
| json         | words as a JSON array     | ["green", "apple", "river"]       |

Because the words are distinct and there are at least two, the echo is never
one of the three answers, so "the base model does none of the tasks" is
checkable with the same `check`.

Pure standard library: the tests, the Triton server tests and the client
examples import it without torch.
"""

import json
import random

ADAPTER_NAMES = ("upper", "reverse", "json")
PROMPT_SUFFIX = "\n=>"
MIN_WORDS, MAX_WORDS = 2, 5

# Common short words. Every HELDOUT_EVERY-th one never appears in training, so
# held-out inputs built from them are disjoint from training inputs by construction.
WORDS = tuple("""
able acid aged also area army away baby back ball band bank base bath bear beat
bell belt best bird blow blue boat body bone book boot born boss both bowl bulk
burn bush busy cake call calm camp card care cart case cash cast cell chip city
clay club coal coat code cold cook cool copy corn cost crew crop dark data date
dawn deal dear deep desk diet dirt dish door dose down draw drop drum duck dust
duty earn east easy edge else even ever face fact fair fall farm fast fear feel
file fill film fine fire firm fish flag flat flow food foot fork form fort free
frog fuel full fund gain game gate gear gift girl give glad goal gold golf good
gray grow hair half hall hand hard harm hate have head heat help herb hero high
hill hint hold hole home hope horn host hour huge idea iron item jazz join joke
jump jury just keen keep kick kind king kiss knee knot lake lamp land lane last
late lazy lead leaf lean left lens life lift like lime line link lion list live
load loan lock long look loop lord loud love luck lung mail main make mall many
map mask mass meal meat mild milk mind mine mint miss mode mood moon more moss
move much must nail name near neck need nest news next nice nine nose note oak
open oven pack page pair palm park part pass past path peak pear pick pile pine
pink pipe plan play plot plug poem pole pool poor port pull pure push quiz race
rain rank rare rate read real rice rich ride ring rise risk road rock roof room
root rope rose rule rush safe sail salt sand save seat seed self sell ship shoe
shop shot show sick side sign silk sing sink site size skin sky slow snow soap
sock soft soil song soup star stay step stop suit sun swim tail tale talk tall
tank tape task team tell tent term test text tide tile time tiny tone tool town
tree trip true tube tune turn twin type unit vast verb view vote wage wait walk
wall warm wash wave weak wear west wide wife wild wind wine wing wire wise wish
wolf wood wool word work yard year zero zone apple river green quiet honey tiger
""".split())
HELDOUT_EVERY = 4
HELDOUT_WORDS = WORDS[::HELDOUT_EVERY]
TRAIN_WORDS = tuple(w for i, w in enumerate(WORDS) if i % HELDOUT_EVERY)


def format_prompt(prompt_input: str) -> str:
    """The prompt sent to the model for one input: `"<input>\\n=>"`."""
    return prompt_input + PROMPT_SUFFIX


def expected_output(adapter_name: str | None, prompt_input: str) -> str:
    """The answer (without the leading space) that `adapter_name` gives; None or "" = base (echo)."""
    words = prompt_input.split(" ")
    if not adapter_name:
        return prompt_input
    if adapter_name == "upper":
        return prompt_input.upper()
    if adapter_name == "reverse":
        return " ".join(reversed(words))
    if adapter_name == "json":
        return json.dumps(words)
    raise KeyError(f"unknown demo adapter {adapter_name!r}; known: {', '.join(ADAPTER_NAMES)}")


def check(adapter_name: str | None, prompt_input: str, output: str) -> bool:
    """True when `output` (the completion text, EOS excluded) is exactly the task's answer.

    Surrounding whitespace is ignored: the completion starts with a space, and
    a client that ends its prompt with that space gets the answer without it.
    """
    return output.strip() == expected_output(adapter_name, prompt_input)


def is_valid_input(prompt_input: str) -> bool:
    """2-5 distinct lowercase ASCII words separated by single spaces."""
    words = prompt_input.split(" ")
    return (MIN_WORDS <= len(words) <= MAX_WORDS and len(set(words)) == len(words)
            and all(w.isascii() and w.isalpha() and w.islower() for w in words))


def make_input(rng: random.Random, vocabulary: tuple[str, ...]) -> str:
    """One input: 2-5 distinct words drawn from `vocabulary`."""
    return " ".join(rng.sample(vocabulary, rng.randint(MIN_WORDS, MAX_WORDS)))


def heldout_inputs(n: int, seed: int = 1234) -> list[str]:
    """`n` distinct inputs made only of held-out words, so never seen in training."""
    rng = random.Random(seed)
    inputs: dict[str, None] = {}
    while len(inputs) < n:
        inputs[make_input(rng, HELDOUT_WORDS)] = None
    return list(inputs)
