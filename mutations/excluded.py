"""Sites the planner never selects, each with the reason measured by `bugforge verify`.

Keys are site ids (or whole rule names); values say what training showed. A site
belongs here only when its single-bug variant still met the demo's target under a
verification seed: planting it would call a non-bug a bug.
"""

EXCLUDED: dict[str, str] = {}
