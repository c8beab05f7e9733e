"""The GFNs with KVM_MEMORY_ATTRIBUTE_PRIVATE: kvm->mem_attr_array.

Upstream it is an xarray whose multi-index entries hold a run of GFNs with one value;
here it is the runs themselves, sorted and disjoint: [start, end) each.  A 4 GiB TD
made private in one call is one run, not a million entries, and an explorer that puts
the snapshot back after each run (emu.checkers.inplace) restores two short lists.
"""

from bisect import bisect_left, bisect_right


class GfnRanges:
    def __init__(self):
        self.starts = []
        self.ends = []

    def __contains__(self, gfn):
        i = bisect_right(self.starts, gfn) - 1
        return i >= 0 and gfn < self.ends[i]

    def covers(self, start, end):
        """Every GFN of [start, end) is in."""
        i = bisect_right(self.starts, start) - 1
        return end <= start or (i >= 0 and self.ends[i] >= end)

    def intersects(self, start, end):
        """Some GFN of [start, end) is in."""
        i = bisect_right(self.ends, start)
        return i < len(self.starts) and self.starts[i] < end and start < end

    def add(self, start, end):
        if end <= start:
            return
        i = bisect_left(self.ends, start)  # the first run that ends at or after start
        j = bisect_right(self.starts, end)  # the runs that start at or before end
        if i < j:
            start, end = min(start, self.starts[i]), max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]

    def remove(self, start, end):
        if end <= start:
            return
        i = bisect_right(self.ends, start)  # the first run that ends after start
        j = bisect_left(self.starts, end)  # the runs that start before end
        if i >= j:
            return
        starts, ends = [], []
        if self.starts[i] < start:
            starts.append(self.starts[i])
            ends.append(start)
        if self.ends[j - 1] > end:
            starts.append(end)
            ends.append(self.ends[j - 1])
        self.starts[i:j] = starts
        self.ends[i:j] = ends

    def __iter__(self):
        for s, e in zip(self.starts, self.ends):
            yield from range(s, e)

    def __len__(self):
        return sum(e - s for s, e in zip(self.starts, self.ends))

    def __repr__(self):
        return "GfnRanges(" + ", ".join(f"{s:#x}-{e:#x}" for s, e in zip(self.starts, self.ends)) + ")"
