"""Which rows of the engine's cache each request holds.

A request holds an ordinary row from admission to its end.  Under CO2 it first decodes in a measurement row
(the whole prompt plus ``N`` slots) and moves into its ordinary row, cut to its budget, after ``N`` steps; the
scheduler sees that as one :class:`Seat` whose decoding row changes, not as a special case.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Seat:
    """The rows of one request: ``row`` its ordinary row, ``measuring`` its measurement row while it measures."""

    row: int
    measuring: int | None = None

    @property
    def decoding(self) -> int:
        """The row its next token comes from."""
        return self.row if self.measuring is None else self.measuring


class Seats:
    """The free and taken rows: ``rows`` ordinary rows ``[0, rows)``, then ``wide_rows`` measurement rows.

    With measurement rows (CO2) a request is seated only when both kinds have a free row.
    """

    def __init__(self, rows: int, wide_rows: int):
        self.free = list(range(rows))
        self.free_wide = list(range(rows, rows + wide_rows))
        self.wide_rows = wide_rows

    @property
    def available(self) -> bool:
        """Whether a new request can be seated."""
        return bool(self.free) and (not self.wide_rows or bool(self.free_wide))

    def take(self) -> Seat:
        """A seat for a new request: the lowest free rows (check :attr:`available` first)."""
        return Seat(self.free.pop(0), self.free_wide.pop(0) if self.wide_rows else None)

    def moved(self, seat: Seat) -> int:
        """Its measurement is over: free the seat's measurement row and return it (the request now decodes in
        its ordinary row)."""
        wide, seat.measuring = seat.measuring, None
        self._give(self.free_wide, wide)
        return wide

    def release(self, seat: Seat) -> list[int]:
        """Free every row of ``seat``; return them."""
        rows = [seat.row] + ([] if seat.measuring is None else [seat.measuring])
        self._give(self.free, seat.row)
        if seat.measuring is not None:
            self._give(self.free_wide, seat.measuring)
        return rows

    @staticmethod
    def _give(pool: list[int], row: int) -> None:
        pool.append(row)
        pool.sort()

    @property
    def measuring(self) -> int:
        """Measurement rows in use."""
        return self.wide_rows - len(self.free_wide)
