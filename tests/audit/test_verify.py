"""The decision table that names a chain break (services/audit/.../_verify.classify).

tests/audit/test_tamper.py produces each situation for real; these cover every branch,
including those a test can only reach by dropping constraints (ids below 1).
"""

from __future__ import annotations

import pytest

from mhv_audit import BreakKind, Facts, classify

M, X, R, INS = BreakKind.MODIFIED, BreakKind.MISSING, BreakKind.REORDERED, BreakKind.INSERTED


@pytest.mark.parametrize(
    ("facts", "row_id", "kind"),
    [
        (Facts(row_id=11, expected_id=11, head_id=10, beyond_head=True), 11, INS),
        (Facts(row_id=-3, expected_id=1, head_id=10), -3, INS),
        (Facts(row_id=7, expected_id=4, head_id=10), 4, X),
        # Content changed, links intact.
        (Facts(row_id=4, expected_id=4, head_id=10, intact=False), 4, M),
        # Content and link changed, link pointing nowhere.
        (
            Facts(row_id=4, expected_id=4, head_id=10, intact=False, link_ok=False),
            4,
            M,
        ),
        # Intact, but linked to a hash nobody has while its successor still links to it: the
        # predecessor was rewritten with a new hash.
        (Facts(row_id=5, expected_id=5, head_id=10, link_ok=False), 4, M),
        (Facts(row_id=1, expected_id=1, head_id=10, link_ok=False), 1, M),
        # Intact, linked to nothing, nothing links to it: a replacement.
        (Facts(row_id=5, expected_id=5, head_id=10, link_ok=False, referenced=False), 5, M),
        # Intact, linked to nothing, and its successor links past it: inserted.
        (
            Facts(
                row_id=5,
                expected_id=5,
                head_id=10,
                link_ok=False,
                referenced=False,
                successor_skips=True,
            ),
            5,
            INS,
        ),
        # Intact, chained after another existing row (or as the first row): reordered.
        (Facts(row_id=5, expected_id=5, head_id=10, link_ok=False, parent_id=8), 5, R),
        (Facts(row_id=5, expected_id=5, head_id=10, link_ok=False, parent_id=0), 5, R),
        # Valid only under another id: moved, or renumbered after a deletion.
        (
            Facts(row_id=4, expected_id=4, head_id=10, intact=False, link_ok=False, home_id=5),
            4,
            X,
        ),
        (
            Facts(
                row_id=4,
                expected_id=4,
                head_id=10,
                intact=False,
                link_ok=False,
                home_id=5,
                parent_id=5,
            ),
            4,
            R,
        ),
        (
            Facts(row_id=5, expected_id=5, head_id=10, intact=False, link_ok=False, home_id=4),
            5,
            R,
        ),
        # The previous row shares this row's predecessor and nobody links to it: spliced in.
        (
            Facts(
                row_id=6,
                expected_id=6,
                head_id=11,
                intact=False,
                link_ok=False,
                home_id=5,
                parent_id=4,
                predecessor_is_sibling=True,
                predecessor_referenced=False,
            ),
            5,
            INS,
        ),
        # Bad hash, nothing links to it, its successor shares its predecessor: inserted.
        (
            Facts(
                row_id=5,
                expected_id=5,
                head_id=11,
                intact=False,
                referenced=False,
                successor_is_sibling=True,
            ),
            5,
            INS,
        ),
        (
            Facts(
                row_id=5,
                expected_id=5,
                head_id=11,
                intact=False,
                link_ok=False,
                referenced=False,
                successor_skips=True,
            ),
            5,
            INS,
        ),
        # Link changed to point at an existing row.
        (
            Facts(row_id=4, expected_id=4, head_id=10, intact=False, link_ok=False, parent_id=4),
            4,
            R,
        ),
    ],
)
def test_classify(facts: Facts, row_id: int, kind: BreakKind) -> None:
    found = classify(facts)
    assert (found.row_id, found.kind) == (row_id, kind), found.detail
    assert found.detail
