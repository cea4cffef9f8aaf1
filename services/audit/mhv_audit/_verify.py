"""What went wrong at a broken link: modified, missing, reordered or inserted.

The scan (`mhv_audit._chain.ChainScanner`) stops at the first row out of place. Every row's
stored hash names the row as it was appended, and its ``prev_hash`` names the row it was
appended after, so the rows around a break say what happened to them:

- a row whose content no longer matches its hash, while its neighbours still link to it, was
  MODIFIED; so was a row whose successor links to a hash that no row has any more (it was
  rewritten together with its hash);
- a gap in the ids, or the end of the table before the head's last id, means rows are MISSING
  (ids are gap-free by construction); so does a row whose content matches its hash only under
  a higher id, when the row it was chained after is gone (deleted, then renumbered);
- a row that links to a row that exists elsewhere, or whose content matches its hash only
  under another id, was REORDERED;
- a row past the chain head, below id 1, or one that nothing links to while its successor
  links past it (or to the same predecessor) was INSERTED.

`classify` is the pure decision over those facts; `diagnose` collects them with a few lookups
in the same snapshot the scan read.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mhv_audit._chain import GENESIS_HASH, StoredRow, row_hash
from mhv_audit._store import ChainHead, ChainSnapshot

# How far from its id a moved row is looked for (a probe is one hash per candidate id).
MOVE_PROBE_DISTANCE = 256


class BreakKind(enum.Enum):
    """What is wrong at a broken link."""

    MODIFIED = "modified"
    MISSING = "missing"
    REORDERED = "reordered"
    INSERTED = "inserted"


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """The first broken link of a chain.

    Attributes:
        row_id: The row at fault (for MISSING: the first absent id).
        kind: What happened there.
        detail: One sentence for the operator.

    """

    row_id: int
    kind: BreakKind
    detail: str


@dataclass(frozen=True, slots=True)
class Facts:
    """What the rows around the first out-of-place row say.

    Attributes:
        row_id: Id of the row the scan stopped at.
        expected_id: The id the scan expected there.
        head_id: The chain head's last id.
        beyond_head: The row lies past the head (and the range reaches the head).
        link_ok: Its prev_hash is the previous row's hash.
        intact: Its content matches its hash (and its jsonb details equal the hashed text).
        home_id: Another id under which its content matches its hash, if any.
        parent_id: Id of the row its prev_hash names (0: the genesis hash), if any exists.
        referenced: Some row links to it, or the head names it.
        successor_skips: The next row links to the previous row, past this one.
        successor_is_sibling: The next row links to the same predecessor as this one.
        predecessor_is_sibling: The previous row links to the same predecessor as this one.
        predecessor_referenced: Some row links to the previous row, or the head names it.

    """

    row_id: int
    expected_id: int
    head_id: int
    beyond_head: bool = False
    link_ok: bool = True
    intact: bool = True
    home_id: int | None = None
    parent_id: int | None = None
    referenced: bool = True
    successor_skips: bool = False
    successor_is_sibling: bool = False
    predecessor_is_sibling: bool = False
    predecessor_referenced: bool = True


def _ids(first: int, last: int) -> str:
    return f"row {first} is" if first == last else f"rows {first}..{last} are"


def classify(f: Facts) -> ChainBreak:
    """Decide what happened at the first out-of-place row (see the module docstring)."""
    r = f.row_id
    if f.beyond_head:
        return ChainBreak(
            r,
            BreakKind.INSERTED,
            f"row {r} lies past the chain head (row {f.head_id}): it was not appended by the "
            "audit service",
        )
    if r < f.expected_id:
        return ChainBreak(
            r, BreakKind.INSERTED, f"row {r} lies outside the chain, which starts at row 1"
        )
    if r > f.expected_id:
        return ChainBreak(
            f.expected_id,
            BreakKind.MISSING,
            f"{_ids(f.expected_id, r - 1)} absent; the chain resumes at row {r}",
        )
    if f.predecessor_is_sibling and not f.predecessor_referenced:
        return ChainBreak(
            r - 1,
            BreakKind.INSERTED,
            f"row {r - 1} links to the same predecessor as row {r} and nothing links to it: "
            "it was added to the chain",
        )
    if f.intact:
        if f.parent_id is not None:
            after = "as the first row" if f.parent_id == 0 else f"after row {f.parent_id}"
            return ChainBreak(
                r,
                BreakKind.REORDERED,
                f"row {r} is intact but was chained {after}, not after row {r - 1}",
            )
        if f.successor_skips:
            return ChainBreak(
                r,
                BreakKind.INSERTED,
                f"row {r} links to no row of the log, nothing links to it, and row {r + 1} "
                f"links to row {r - 1}",
            )
        if f.referenced and r > 1:
            return ChainBreak(
                r - 1,
                BreakKind.MODIFIED,
                f"row {r} links to a hash no row has any more: row {r - 1} was rewritten "
                "together with its hash",
            )
        return ChainBreak(
            r,
            BreakKind.MODIFIED,
            f"row {r} links to a hash no row has and nothing links to it: it replaced the "
            "original row",
        )
    if f.home_id is not None:
        if f.parent_id is None and f.home_id > r:
            return ChainBreak(
                r,
                BreakKind.MISSING,
                f"the row at id {r} was appended as row {f.home_id}: rows before it were "
                "deleted and the later ids renumbered",
            )
        return ChainBreak(
            r,
            BreakKind.REORDERED,
            f"the row at id {r} was appended as row {f.home_id} and has been moved",
        )
    if f.link_ok:
        if not f.referenced and f.successor_is_sibling:
            return ChainBreak(
                r,
                BreakKind.INSERTED,
                f"row {r} does not match its hash, nothing links to it, and row {r + 1} links "
                "to the same predecessor",
            )
        return ChainBreak(r, BreakKind.MODIFIED, f"row {r}'s content no longer matches its hash")
    if f.parent_id is not None:
        target = "itself" if f.parent_id == r else f"row {f.parent_id}"
        return ChainBreak(
            r, BreakKind.REORDERED, f"row {r}'s link was changed to point at {target}"
        )
    if not f.referenced and f.successor_skips:
        return ChainBreak(
            r,
            BreakKind.INSERTED,
            f"row {r} matches no hash, nothing links to it, and row {r + 1} links to row {r - 1}",
        )
    return ChainBreak(r, BreakKind.MODIFIED, f"row {r}'s content and link no longer match its hash")


async def _referenced(
    snap: ChainSnapshot, row: StoredRow, successor: StoredRow | None, head: ChainHead
) -> bool:
    if successor is not None and successor.prev_hash == row.hash:
        return True
    if head.last_id == row.id and head.last_hash == row.hash:
        return True
    return bool(await snap.ids_linking_to(row.hash))


def _home(row: StoredRow) -> int | None:
    if not row.details_match:
        return None
    for distance in range(1, MOVE_PROBE_DISTANCE + 1):
        for candidate in (row.id + distance, row.id - distance):
            if candidate > 0 and row_hash(row, as_id=candidate) == row.hash:
                return candidate
    return None


async def diagnose(
    snap: ChainSnapshot,
    row: StoredRow,
    predecessor: StoredRow | None,
    *,
    expected_id: int,
    expected_prev: bytes | None,
    head: ChainHead,
    head_in_view: bool,
) -> ChainBreak:
    """Collect the facts around `row`, the first out-of-place row, and classify them.

    Args:
        snap: The snapshot the scan read.
        row: The row the scan stopped at.
        predecessor: The last row the scan accepted, if any.
        expected_id: The id the scan expected.
        expected_prev: The hash the row should link to (None: not checked).
        head: The chain head in the same snapshot.
        head_in_view: Whether the verified range reaches the head.

    """
    facts = Facts(
        row_id=row.id,
        expected_id=expected_id,
        head_id=head.last_id,
        beyond_head=head_in_view and row.id > head.last_id,
    )
    if facts.beyond_head or row.id != expected_id:
        return classify(facts)
    if not row.details_match:
        return ChainBreak(
            row.id,
            BreakKind.MODIFIED,
            f"row {row.id}'s queryable details (jsonb) no longer equal its hashed details",
        )
    if predecessor is None or predecessor.id != row.id - 1:
        found = await snap.row(row.id - 1)
        predecessor = StoredRow.of(found) if found is not None else None
    found = await snap.row(row.id + 1)
    successor = StoredRow.of(found) if found is not None else None
    intact = row.details_match and row_hash(row) == row.hash
    if row.prev_hash == GENESIS_HASH:
        parent_id: int | None = 0
    else:
        parents = await snap.ids_with_hash(row.prev_hash)
        parent_id = parents[0] if parents else None
    predecessor_is_sibling = predecessor is not None and predecessor.prev_hash == row.prev_hash
    predecessor_referenced = True
    if predecessor is not None and predecessor_is_sibling:
        predecessor_referenced = await _referenced(snap, predecessor, row, head)
    facts = Facts(
        row_id=row.id,
        expected_id=expected_id,
        head_id=head.last_id,
        link_ok=expected_prev is None or row.prev_hash == expected_prev,
        intact=intact,
        home_id=None if intact else _home(row),
        parent_id=parent_id,
        referenced=await _referenced(snap, row, successor, head),
        successor_skips=successor is not None
        and expected_prev is not None
        and successor.prev_hash == expected_prev,
        successor_is_sibling=successor is not None and successor.prev_hash == row.prev_hash,
        predecessor_is_sibling=predecessor_is_sibling,
        predecessor_referenced=predecessor_referenced,
    )
    return classify(facts)
