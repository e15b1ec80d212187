//! Changed Block Tracking queries: `QueryChangedDiskAreas`, one page or the whole disk.
//!
//! vCenter returns a limited number of areas per call; the answer's `startOffset + length` is
//! where the next call starts. Stopping early loses data (a bug others shipped), and a server
//! answer that does not move forward must end in an error, not a loop.

use std::sync::atomic::{AtomicBool, Ordering};

use vim_rs::mo::VirtualMachine;

use super::error::{fault_field, fault_of};
use super::{Disk, SnapshotRef, VSphere, VSphereError, VmRef};

/// A byte range of a disk to copy, as CBT reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChangedArea {
    pub start: u64,
    pub length: u64,
}

impl ChangedArea {
    /// One past the last byte (saturating: a server's area may not overflow it).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.length)
    }
}

/// One page of `QueryChangedDiskAreas`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskChangeInfo {
    /// Where the page starts (the requested offset).
    pub start_offset: u64,
    /// How much of the disk the page covers; the next page starts at `start_offset + length`.
    pub length: u64,
    pub areas: Vec<ChangedArea>,
}

impl VSphere {
    /// One page of changed areas of disk `device_key` at `snapshot`, since `change_id` (`"*"`:
    /// the allocated areas). A change ID vCenter no longer accepts is
    /// [`VSphereError::InvalidChangeId`]: copy the whole disk.
    pub async fn query_changed_disk_areas(
        &self,
        vm: &VmRef,
        snapshot: &SnapshotRef,
        device_key: i32,
        start_offset: u64,
        change_id: &str,
    ) -> Result<DiskChangeInfo, VSphereError> {
        let offset = i64::try_from(start_offset).map_err(|_| VSphereError::Fault {
            method: "QueryChangedDiskAreas".to_string(),
            fault: "InvalidArgument".to_string(),
            message: format!("start offset {start_offset} is out of range"),
        })?;
        let snapshot_mor = &snapshot.mor();
        // Set when vCenter refuses the change ID itself (InvalidArgument on `changeId`).
        let stale = &AtomicBool::new(false);
        let page = self
            .call("QueryChangedDiskAreas", || async move {
                VirtualMachine::new(self.handle(), &vm.moref)
                    .query_changed_disk_areas(Some(snapshot_mor), device_key, offset, change_id)
                    .await
                    .inspect_err(|e| {
                        if let Some(("InvalidArgument", f)) = fault_of(e)
                            && fault_field(f, "invalidProperty") == Some("changeId")
                        {
                            stale.store(true, Ordering::Relaxed);
                        }
                    })
            })
            .await
            .map_err(|e| match e {
                VSphereError::Fault { fault, message, .. } if stale.load(Ordering::Relaxed) => {
                    VSphereError::InvalidChangeId {
                        device_key,
                        change_id: change_id.to_string(),
                        message: format!("vCenter answered {fault}: {message}"),
                    }
                }
                e => e,
            })?;
        let bad = |what: &str| {
            VSphereError::Transport(format!(
                "QueryChangedDiskAreas of disk {device_key} returned {what}"
            ))
        };
        let areas = page
            .changed_area
            .unwrap_or_default()
            .into_iter()
            .map(|a| {
                Ok(ChangedArea {
                    start: u64::try_from(a.start).map_err(|_| bad("a negative area start"))?,
                    length: u64::try_from(a.length).map_err(|_| bad("a negative area length"))?,
                })
            })
            .collect::<Result<Vec<_>, VSphereError>>()?;
        Ok(DiskChangeInfo {
            start_offset: u64::try_from(page.start_offset)
                .map_err(|_| bad("a negative start offset"))?,
            length: u64::try_from(page.length).map_err(|_| bad("a negative length"))?,
            areas,
        })
    }

    /// All changed areas of `disk` at `snapshot` since `change_id`, paging from offset 0 to
    /// the disk's capacity. Sorted, non-overlapping, within the disk.
    pub async fn changed_areas(
        &self,
        vm: &VmRef,
        snapshot: &SnapshotRef,
        disk: &Disk,
        change_id: &str,
    ) -> Result<Vec<ChangedArea>, VSphereError> {
        let mut pages = Pages::new(disk.capacity);
        let mut calls = 0u32;
        while let Some(offset) = pages.next_offset() {
            let page = self
                .query_changed_disk_areas(vm, snapshot, disk.key, offset, change_id)
                .await?;
            calls += 1;
            pages.add(&page).map_err(|message| VSphereError::Fault {
                method: "QueryChangedDiskAreas".to_string(),
                fault: "NoProgress".to_string(),
                message: format!("disk {} ({}): {message}", disk.key, disk.label),
            })?;
        }
        let areas = pages.into_areas();
        tracing::debug!(
            disk = disk.key,
            calls,
            areas = areas.len(),
            change_id,
            "changed areas"
        );
        Ok(areas)
    }
}

/// Accumulates pages of one disk's changed areas and says where the next page starts.
#[derive(Debug)]
struct Pages {
    capacity: u64,
    next: u64,
    areas: Vec<ChangedArea>,
}

impl Pages {
    fn new(capacity: u64) -> Self {
        Pages {
            capacity,
            next: 0,
            areas: Vec::new(),
        }
    }

    /// Where to ask next; `None` once the disk is covered.
    fn next_offset(&self) -> Option<u64> {
        (self.next < self.capacity).then_some(self.next)
    }

    /// Takes one page. Refuses a page that does not move past the requested offset.
    ///
    /// vCenter lists a page's areas by start, but the API does not promise it: the page's
    /// areas are clipped to what it may report, sorted and joined before they are added, so an
    /// unsorted, overlapping or repeating page loses nothing and reports nothing twice.
    fn add(&mut self, page: &DiskChangeInfo) -> Result<(), String> {
        let end = page.start_offset.saturating_add(page.length);
        if page.start_offset > self.next || end <= self.next {
            return Err(format!(
                "asked from offset {}, the answer covers [{}, {}): no progress",
                self.next, page.start_offset, end
            ));
        }
        // Earlier pages reported nothing at or past `self.next`: clipping to it also keeps
        // an area repeated from the previous page from being reported twice.
        let mut areas: Vec<ChangedArea> = page
            .areas
            .iter()
            .filter_map(|area| {
                let start = area.start.max(self.next);
                let stop = area.end().min(end).min(self.capacity);
                (start < stop).then(|| ChangedArea {
                    start,
                    length: stop - start,
                })
            })
            .collect();
        areas.sort_unstable();
        for area in areas {
            match self.areas.last_mut() {
                Some(last) if last.end() >= area.start => {
                    last.length = area.end().max(last.end()) - last.start
                }
                _ => self.areas.push(area),
            }
        }
        self.next = end;
        Ok(())
    }

    fn into_areas(self) -> Vec<ChangedArea> {
        self.areas
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(start: u64, length: u64, areas: &[(u64, u64)]) -> DiskChangeInfo {
        DiskChangeInfo {
            start_offset: start,
            length,
            areas: areas
                .iter()
                .map(|&(start, length)| ChangedArea { start, length })
                .collect(),
        }
    }

    fn areas(v: &[(u64, u64)]) -> Vec<ChangedArea> {
        v.iter()
            .map(|&(start, length)| ChangedArea { start, length })
            .collect()
    }

    #[test]
    fn pages_cover_the_disk_and_join() {
        let mut p = Pages::new(1000);
        assert_eq!(p.next_offset(), Some(0));
        p.add(&page(0, 300, &[(0, 10), (100, 200)]))
            .expect("first page");
        assert_eq!(p.next_offset(), Some(300));
        // Touches the previous page's last area: merged.
        p.add(&page(300, 700, &[(300, 50), (900, 200)]))
            .expect("second page");
        assert_eq!(p.next_offset(), None);
        assert_eq!(p.into_areas(), areas(&[(0, 10), (100, 250), (900, 100)]));
    }

    #[test]
    fn a_page_without_progress_is_an_error() {
        let mut p = Pages::new(1000);
        p.add(&page(0, 500, &[])).expect("first page");
        assert!(p.add(&page(500, 0, &[(500, 10)])).is_err());
        assert!(p.add(&page(0, 500, &[])).is_err(), "going backwards");
        assert!(p.add(&page(600, 100, &[])).is_err(), "skipping ahead");
    }

    #[test]
    fn areas_outside_the_page_or_repeated_are_clipped() {
        let mut p = Pages::new(1000);
        p.add(&page(0, 400, &[(100, 200), (350, 100)]))
            .expect("page");
        // The server repeats part of the last area: not reported twice.
        p.add(&page(400, 600, &[(350, 100), (990, 100)]))
            .expect("page");
        assert_eq!(p.into_areas(), areas(&[(100, 200), (350, 100), (990, 10)]));
    }

    #[test]
    fn an_unsorted_page_loses_no_area() {
        let mut p = Pages::new(1000);
        p.add(&page(0, 600, &[(500, 10), (100, 10), (300, 50), (0, 5)]))
            .expect("page");
        p.add(&page(600, 400, &[(900, 100), (600, 10)]))
            .expect("page");
        assert_eq!(
            p.into_areas(),
            areas(&[
                (0, 5),
                (100, 10),
                (300, 50),
                (500, 10),
                (600, 10),
                (900, 100)
            ])
        );
    }

    #[test]
    fn overlapping_and_adjacent_areas_of_a_page_join_in_any_order() {
        let mut p = Pages::new(1000);
        // (200, 100) overlaps (250, 100); (350, 50) touches it; (100, 50) stands alone.
        p.add(&page(
            0,
            1000,
            &[(350, 50), (100, 50), (250, 100), (200, 100)],
        ))
        .expect("page");
        assert_eq!(p.into_areas(), areas(&[(100, 50), (200, 200)]));
        // An area inside another, listed after it or before it.
        for order in [[(10, 500), (100, 20)], [(100, 20), (10, 500)]] {
            let mut p = Pages::new(1000);
            p.add(&page(0, 1000, &order)).expect("page");
            assert_eq!(p.into_areas(), areas(&[(10, 500)]), "{order:?}");
        }
    }

    #[test]
    fn an_area_listed_twice_is_reported_once() {
        let mut p = Pages::new(1000);
        p.add(&page(
            0,
            1000,
            &[(700, 64), (100, 64), (700, 64), (100, 64)],
        ))
        .expect("page");
        assert_eq!(p.into_areas(), areas(&[(100, 64), (700, 64)]));
    }

    #[test]
    fn unsorted_areas_outside_the_page_or_the_disk_are_clipped() {
        let mut p = Pages::new(1000);
        p.add(&page(0, 300, &[(250, 100), (50, 10)])).expect("page");
        // Listed first: an area ending past the disk; then ones before the page, straddling
        // its start, and wholly past it.
        p.add(&page(
            300,
            700,
            &[(950, 500), (0, 100), (280, 40), (1200, 10)],
        ))
        .expect("page");
        assert_eq!(p.next_offset(), None);
        assert_eq!(p.into_areas(), areas(&[(50, 10), (250, 70), (950, 50)]));
    }

    #[test]
    fn zero_length_areas_are_dropped_wherever_they_are() {
        let mut p = Pages::new(1000);
        p.add(&page(0, 500, &[(400, 0), (100, 10), (0, 0), (110, 0)]))
            .expect("page");
        p.add(&page(500, 500, &[(500, 0), (999, 0), (u64::MAX, 0)]))
            .expect("page");
        assert_eq!(p.into_areas(), areas(&[(100, 10)]));
    }

    #[test]
    fn an_area_whose_end_overflows_is_clipped_to_the_disk() {
        let mut p = Pages::new(1000);
        p.add(&page(0, 1000, &[(900, u64::MAX), (10, 10)]))
            .expect("page");
        assert_eq!(p.into_areas(), areas(&[(10, 10), (900, 100)]));
    }

    #[test]
    fn empty_disk_needs_no_call() {
        assert_eq!(Pages::new(0).next_offset(), None);
    }
}
