"""An out-of-domain sentence corpus: everyday narrative, news-style and descriptive English prose.

The built-in corpus (:mod:`lowbit.zoo.corpus`) is technical prose from the Python Language
Reference, and MiniLM's calibration draws from it. A quantized model calibrated there can fit
that domain's activations and do worse elsewhere; these sentences measure that. They were written
for lowbit (no source text, no download; same licence as lowbit) and cover fiction and memoir,
news and weather reports, travel, cooking, sport, nature, history, science for a general reader,
and everyday conversation -- none of them about programming. Every sentence has 6 to 40 words,
starts with a capital letter or a quote and ends with ``.``, ``!`` or ``?`` (the corpus rules).
"""
from __future__ import annotations

__all__ = ["prose_sentences", "PROSE_SOURCE", "PROSE"]

PROSE_SOURCE = "lowbit.zoo.prose: narrative, news and descriptive English prose written for lowbit"

PROSE: tuple[str, ...] = (
    # fiction and memoir
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the steps under his breath.",
    "She found the letter tucked inside a cookbook her grandmother had never once opened.",
    "Rain hammered the tin roof while the children argued about whose turn it was to feed the goats.",
    "By the time the train pulled into the village, the snow had buried the platform up to the benches.",
    "He had promised himself he would never return to that town, yet here he was, parking outside the bakery.",
    "The dog waited at the gate each afternoon long after the school bus had stopped coming.",
    "Nobody in the family could remember who had planted the walnut tree behind the barn.",
    "Marta folded the map carefully, as if the mountains printed on it might crease.",
    "The smell of burnt sugar drifted up from the kitchen and woke the whole house.",
    "When the storm finally passed, the fishermen counted their boats and found one missing.",
    "My father taught me to whistle on a summer evening when the power had gone out.",
    "The stranger at the bus stop asked whether I knew the way to the river, then laughed at his own question.",
    "In the attic we discovered a trunk of costumes from a theatre that had closed before the war.",
    "Her voice trembled only once, when she read the name of the ship aloud.",
    "The twins spent the entire holiday building a raft that sank within a minute of launching.",
    "Every window in the farmhouse glowed orange as the sun set behind the hills.",
    "He wrote to her every week for forty years, and she kept every letter in a biscuit tin.",
    "The orchard was silent except for the hum of bees and the occasional thud of a falling apple.",
    "Grandfather insisted that the best stories were the ones told in the dark.",
    "The little boat drifted past the harbour wall just as the church bells began to ring.",
    "She practised the piano for hours, though the neighbours complained about the same four bars.",
    "We walked along the frozen canal, listening to the ice crack somewhere far ahead.",
    "The detective studied the muddy footprints and decided the thief had been wearing his boots on the wrong feet.",
    "A single candle flickered in the chapel window long after the villagers had gone to bed.",
    "I still remember the taste of the peaches we bought from a roadside stall that August.",
    "The wedding guests danced in the courtyard until the musicians were too tired to play.",
    "Across the valley, a shepherd called to his dogs in a language older than the road.",
    "The manuscript had been rejected eleven times before a small publisher in Dublin accepted it.",
    "Her brother came home from sea with a parrot that only knew rude words in Portuguese.",
    "The kettle whistled, the cat leapt from the table, and the teacups rattled on their saucers.",
    # news and reports
    "Heavy rain caused flooding across several northern districts overnight, and dozens of roads remain closed.",
    "The city council voted on Tuesday to extend the tram line to the new hospital.",
    "Firefighters brought the warehouse blaze under control shortly after midnight, officials said.",
    "Shares in the airline rose sharply after it reported a return to profit for the first time in three years.",
    "The museum will reopen next spring after a two-year renovation of its main gallery.",
    "Thousands of runners took part in the annual marathon despite strong winds along the coast.",
    "Police have appealed for witnesses after a van collided with a bus shelter early this morning.",
    "The government announced a new scheme to help first-time buyers with the cost of a deposit.",
    "Farmers say the dry summer has cut the wheat harvest by nearly a third in some regions.",
    "The national orchestra has appointed a young conductor from Lisbon as its new music director.",
    "Local residents gathered outside the town hall to protest against the closure of the library.",
    "A rare painting thought lost for more than a century was found in a private collection in Vienna.",
    "Forecasters expect temperatures to fall below freezing across most of the country by the weekend.",
    "The prime minister is due to visit the flooded villages on Thursday, her office confirmed.",
    "Negotiations between the union and the rail operator broke down late last night without an agreement.",
    "The island's only ferry service has been suspended because of high seas and gale warnings.",
    "Scientists at the university have received funding to study the decline of wild bee populations.",
    "The football club confirmed that its captain will miss the rest of the season with a knee injury.",
    "Ticket sales for the summer festival doubled after the headline act was announced on Monday.",
    "The mayor promised that the new bridge would be finished before the end of next year.",
    "Inflation eased slightly last month as fuel and food prices stopped rising so quickly.",
    "A power cut left around fifteen thousand homes without electricity for most of the evening.",
    "Volunteers planted more than two thousand trees along the riverbank over the weekend.",
    "The election result was so close that a recount has been ordered in three constituencies.",
    "Hospital staff say the new emergency wing has already shortened waiting times considerably.",
    # travel and places
    "The road to the monastery winds through pine forests and crosses the same stream four times.",
    "From the top of the tower you can see three countries on a clear day.",
    "The market opens before dawn, when the fishermen arrive with crates of sardines and squid.",
    "Narrow streets lead down from the cathedral to a square lined with cafes and orange trees.",
    "Our guide warned us that the desert nights would be far colder than we expected.",
    "The ferry crossing takes about two hours, and dolphins are often seen in the strait.",
    "In winter the lake freezes so thickly that families drive their cars across it.",
    "The hotel stood at the end of a long avenue of chestnut trees, its shutters painted blue.",
    "Visitors should bring sturdy shoes, since the path to the waterfall is steep and slippery.",
    "The old quarter of the city is best explored on foot, ideally in the early morning.",
    # food and cooking
    "Knead the dough for ten minutes, then leave it to rise somewhere warm until it has doubled in size.",
    "My aunt's soup always tasted better on the second day, though she never explained why.",
    "Roast the peppers until their skins blister, then peel them while they are still warm.",
    "The bakery on the corner sells out of its rye bread before eight o'clock every morning.",
    "A pinch of salt in the chocolate cake makes the sweetness taste deeper and richer.",
    "We picked blackberries along the hedgerow and ate most of them before we reached home.",
    "The chef served the fish with lemon, capers and a handful of herbs from the garden.",
    "Simmer the beans slowly with garlic and bay leaves until they are soft enough to crush with a spoon.",
    # sport
    "The goalkeeper dived to his left and pushed the penalty around the post.",
    "After five hours on court, the champion finally won the deciding set on a tie-break.",
    "The cyclists climbed the mountain pass in thick fog, barely able to see the road ahead.",
    "She broke the national record in the final lap, to the delight of the home crowd.",
    "Our village cricket team lost again, but the tea afterwards was excellent.",
    "The rowers trained on the river every morning at six, whatever the weather.",
    "Fans sang for the entire second half even though their team was three goals down.",
    "The young swimmer touched the wall a fraction of a second ahead of the favourite.",
    # nature and science for a general reader
    "Swallows return to the same barns year after year, often to the very same nest.",
    "The forest floor was carpeted with bluebells, and the air smelled faintly of wild garlic.",
    "Octopuses can change the colour and texture of their skin in a fraction of a second.",
    "A heavy frost had turned every spider web in the garden into lace.",
    "Whales communicate with songs that can travel hundreds of kilometres through the ocean.",
    "The volcano had been quiet for two centuries before it began to rumble last spring.",
    "Bees tell one another where to find flowers by dancing in figures of eight.",
    "Tides are caused mainly by the pull of the moon on the oceans of the earth.",
    "Oak trees can live for many centuries and support hundreds of kinds of insects.",
    "Lightning heats the air around it to temperatures hotter than the surface of the sun.",
    "The river changes course slowly, cutting into one bank while building up the other.",
    "Penguins huddle together through the polar winter, taking turns on the cold outer edge of the group.",
    "On a moonless night in the mountains, the Milky Way looks like a band of pale smoke.",
    "Autumn leaves turn red and gold as the trees stop making the green pigment that captures sunlight.",
    # history
    "The castle changed hands six times during the war, and each army added a new tower.",
    "Medieval pilgrims walked for months to reach the shrine, sleeping in barns and monasteries.",
    "The canal was dug almost entirely by hand, and it took nearly twenty years to complete.",
    "In the nineteenth century the town was famous for its lace, which was sold as far away as Russia.",
    "The ancient library was said to hold copies of every book known to the ancient world.",
    "Her great-grandmother had sailed to America with nothing but a suitcase and a sewing machine.",
    "The treaty was signed in a railway carriage parked in a quiet forest clearing.",
    "Sailors once navigated by the stars, carrying tables of their positions for every night of the year.",
    # everyday life and conversation
    "Could you pick up some milk and a loaf of bread on your way home tonight?",
    "I missed the last bus, so I walked home through the park in the rain.",
    "The neighbours are having a party again, and it sounds like they have hired a brass band.",
    "We should leave early tomorrow if we want to avoid the traffic on the motorway.",
    "My sister called to say that the baby had finally taken her first steps.",
    "Don't forget to water the tomatoes while we are away for the weekend!",
    "The washing machine broke down halfway through the cycle and flooded the kitchen floor.",
    "He spent the whole afternoon looking for his glasses, which were on top of his head.",
    "Our flight was delayed by four hours, so we played cards on the floor of the departure lounge.",
    "Is it true that the new cinema in town has reclining seats and serves real popcorn?",
    "The children made a snowman in the front garden and dressed it in their father's old scarf.",
    "I borrowed a ladder from the house next door to rescue the cat from the roof.",
    "The dentist told me I should floss more often, as she does every single year.",
    "After the meeting, we all went to the pub on the corner and talked about anything but work.",
    "Grandma knits a new jumper for each of her grandchildren every winter, whether they want one or not.",
    "The queue at the post office stretched out of the door and halfway down the street.",
    "What time does the pharmacy close on Sundays?",
    "We painted the spare room yellow, and now it feels like sunshine even on grey days.",
    "The old piano in the hall is badly out of tune, but the children love to play it.",
    "She laughed so hard at the joke that she had to sit down on the kerb.",
    "Somebody left a bunch of tulips on the doorstep with a note that simply said thank you.",
    "The garden fence blew down in the night, and the chickens escaped into the lane.",
    "They moved to the coast after retiring and now swim in the sea every morning.",
    "I have read that novel three times, and the ending still makes me cry.",
    "The library van comes to our village every other Wednesday, and everyone turns out to meet it.",
    "At the end of the concert, the audience stood and applauded for almost ten minutes.",
    "My uncle claims he once shook hands with a famous actor in a railway station cafe.",
    "The bicycle had a flat tyre, a squeaking chain and a bell that no longer rang.",
)


def prose_sentences(n: int | None = None) -> list[str]:
    """``n`` of the out-of-domain sentences, evenly spread over the list (all if ``n`` is None)."""
    if n is None:
        return list(PROSE)
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int or None; got {type(n).__name__}")
    if not 1 <= n <= len(PROSE):
        raise ValueError(f"n must be between 1 and {len(PROSE)} (the prose corpus size); got {n}")
    return [PROSE[(i * len(PROSE)) // n] for i in range(n)]

