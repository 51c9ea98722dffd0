"""Path types in words: a relation name (Freebase's ``film.film.directed_by``, MovieLens genres, a user's
own relation names) → how the recommended film relates to the film the user rated."""

from __future__ import annotations

# (substring of the relation name, phrase "this film …"), first match wins; {entity} is the shared
# entity's name where the catalog has one
PHRASES = (
    ("movielens.genre", "is also a {entity} film"),
    ("direct", "has the same director"),
    ("actor", "shares an actor with it"),
    ("writ", "has the same writer"),
    ("produced_by", "has the same producer"),
    ("producer", "has the same producer"),
    ("production_compan", "comes from the same production company"),
    ("cinematograph", "has the same cinematographer"),
    ("award_won", "won the same award"),
    ("award_nomination", "was nominated for the same award"),
    ("award", "shares an award with it"),
    ("genre", "has the same genre"),
    ("language", "is in the same language"),
    ("country", "comes from the same country"),
    ("content_rating", "has the same content rating"),
    (".rating", "has the same content rating"),
    ("subject", "is about the same subject"),
    ("sequel", "belongs to the same series"),
    ("prequel", "belongs to the same series"),
)
COLLABORATIVE = "collaborative"  # the path type user → film → other user → film


def relation_phrase(relation: str, entity: str | None = None) -> str:
    """'has the same director', 'is also a Crime film', or, for a relation we have no words for,
    "shares 'relation' with it" (the relation's own name: never a bare id)."""
    low = relation.lower()
    for key, phrase in PHRASES:
        if key in low:
            if "{entity}" in phrase:
                return phrase.format(entity=entity) if entity else "has the same genre"
            return phrase
    return f"shares '{relation}' with it"


def reason_text(via_title: str, parts: list[tuple[str, float, str | None]]) -> str:
    """One reason in words. ``parts``: (relation name or COLLABORATIVE, weight, entity name), strongest first."""
    kg = [relation_phrase(r, e) for r, w, e in parts if r != COLLABORATIVE and w > 0]
    if any(p.startswith("is also a ") for p in kg):  # a named genre says more than "the same genre"
        kg = [p for p in kg if p != "has the same genre"]
    kg = list(dict.fromkeys(kg))[:2]  # two phrases at most, without repeats
    has_cf = any(r == COLLABORATIVE and w > 0 for r, w, _ in parts)
    cf_first = bool(parts) and parts[0][0] == COLLABORATIVE
    if kg and not cf_first:
        text = f"you rated *{via_title}*; this film {' and '.join(kg)}"
        return text + ("; users who rated it also rated this film" if has_cf else "")
    if has_cf:
        text = f"users who rated *{via_title}* like you also rated this film"
        return text + (f"; it {' and '.join(kg)}" if kg else "")
    return f"you rated *{via_title}*"
