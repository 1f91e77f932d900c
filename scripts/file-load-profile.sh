#!/bin/sh
# Where the time of a lazy file load goes (issue 14): builds scripts/file-load-profile.c against
# the benchmark kernels, creates a 1 GiB file in each DIR, and for each MODE runs it RUNS times
# under `perf record -e cpu-clock -a -g` (software events only: this VM has no hardware counters),
# then prints the load process's top kernel and user symbols in ns of CPU time per 4 KiB page
# (samples x sample period / pages loaded) and the same summed by kind (zeroing, copy, page-cache
# lookup, allocation, MOVE, fault entry, ...). Idle time is not sampled (cpu-clock stops in idle):
# idle = CPUs x mean wall - CPU time.
#
#   scripts/file-load-profile.sh [RUNS] [DIR...]      (default: 10 /var/tmp /dev/shm)
#   MODES="install pread fresh" scripts/file-load-profile.sh
#   scripts/file-load-profile.sh --report PERF_DATA MEAN_NS_PER_PAGE PAGES   (re-read a profile)
#
# Each run is primed as in the benchmark (cubench_prime_memory), by the driver, with perf
# disabled through its control fifo, so the profile holds the load (with its set-up and munmap),
# not the priming's huge-page zeroing. NO_PRIME=1: no priming (the host faults of free page
# reporting then land in clear_page_erms).
set -eu
FREQ=${FREQ:-4000}
TOP=${TOP:-14}

# report PERF_DATA MEAN_WALL_NS_PER_PAGE PAGES
report() {
    perf report -i "$1" --comms file-load-profi --no-children --sort sym -n --stdio -g none 2>/dev/null |
        awk -v per=$((1000000000 / FREQ)) -v pages="$3" -v top="$TOP" -v wall="$2" '
            /^#/ || NF < 4 { next }
            {
                sym = $4; for (i = 5; i <= NF; i++) sym = sym " " $i
                ns = $2 * per / pages; total += ns
                if (n++ < top) printf "  %-44s %7.1f ns/page (%s)\n", sym, ns, $1
                s = $4
                if (s ~ /clear_page|folio_zero_user|clear_huge|zero_user/) c = "zeroing"
                else if (s ~ /copy_to_iter|copy_user|copy_page|rep_movs|memcpy|memmove|copy_mc/) c = "copy (page cache -> memory)"
                else if (s ~ /move_pages|move_huge|uffd|userfault|move_present|UFFDIO/) c = "UFFDIO_MOVE/uffd"
                else if (s ~ /page_fault|handle_mm_fault|do_anonymous|do_huge_pmd|do_user_addr|handle_pte|lock_vma|__handle_mm|do_fault|filemap_map|next_uptodate|set_pte_range|exc_|get_user_pages|follow_page|vm_normal_page|pte_offset/) c = "fault entry, page tables"
                else if (s ~ /filemap_|shmem_file_read|shmem_get_folio|xas_|folio_unlock|folio_mark_accessed|rcu_read/) c = "page-cache lookup"
                else if (s ~ /freelist|rmqueue|alloc_pages|__alloc|prep_new|post_alloc|vma_alloc|folio_alloc|prep_compound|clear_page_ext|try_charge|charge/) c = "page allocation"
                else if (s ~ /free_|release_pages|tlb_finish|tlb_batch|zap_|unmap_|folios_put|__folio_put|uncharge/) c = "freeing (munmap)"
                else if (s ~ /smp_call|flush_tlb|native_write_msr|send_IPI|x2apic|native_flush|flush_smp|llist/) c = "TLB flush IPIs"
                else if (s ~ /schedule|switch|spin_unlock_irq|try_to_wake|wake_up|futex|ttwu|enqueue|dequeue|update_|pick_|newidle|idle/) c = "scheduling/wakeups"
                else if (s ~ /^\[\.\]|reader_main|fresh_main|expected_sum|load_handler|pread_full|cubench_/) c = "user space"
                else c = "other kernel"
                cat[c] += ns
            }
            END {
                printf "  -- by kind (CPU ns per page, all CPUs; mean wall %s ns/page; set-up and munmap are in the profile)\n", wall
                for (c in cat) printf "  %-44s %7.1f\n", c, cat[c]
                printf "  %-44s %7.1f\n", "total CPU", total
            }'
}

if [ "${1:-}" = "--report" ]; then
    [ $# -eq 4 ] || { echo "usage: $0 --report PERF_DATA MEAN_NS_PER_PAGE PAGES" >&2; exit 2; }
    report "$2" "$3" "$4"
    exit 0
fi

RUNS=${1:-10}
[ $# -gt 0 ] && shift
DIRS=${*:-/var/tmp /dev/shm}
MODES=${MODES:-install install-nofill pread fresh fresh-2t}
BYTES=$((1 << 30))
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$here/.build-profile}
mkdir -p "$out"
bin=$out/file-load-profile
cc -O2 -g -std=gnu11 -D_GNU_SOURCE -I "$here/Sources/CUffd/include" -I "$here/Sources/CUffdBench/include" \
    -o "$bin" "$here/scripts/file-load-profile.c" "$here"/Sources/CUffdBench/*.c "$here"/Sources/CUffd/*.c -lpthread
pages=$((RUNS * BYTES / 4096))
for dir in $DIRS; do
    file=$dir/file-load-profile-$$.dat
    "$bin" "$file" $BYTES create 1
    for mode in $MODES; do
        "$bin" "$file" $BYTES "$mode" 2 >/dev/null # warm the page cache and the allocator
        tag=$(basename "$dir")-$mode
        data=$out/perf-$tag.data
        runs=$out/runs-$tag.txt
        rm -f "$out/ctl.fifo" "$out/ack.fifo"
        mkfifo "$out/ctl.fifo" "$out/ack.fifo"
        exec 3<>"$out/ctl.fifo" 4<>"$out/ack.fifo"
        PERF_CTL_FIFO=$out/ctl.fifo PERF_ACK_FIFO=$out/ack.fifo \
            perf record -q -F "$FREQ" -e cpu-clock -a -g --control "fifo:$out/ctl.fifo,$out/ack.fifo" -o "$data" \
            -- "$bin" "$file" $BYTES "$mode" "$RUNS" >"$runs" 2>/dev/null
        exec 3>&- 4>&-
        med=$(sort -n -k2 "$runs" | awk '{a[NR]=$2} END {print a[int((NR+1)/2)]}')
        mean=$(awk '{t+=$2} END {printf "%.0f", t/NR}' "$runs")
        echo "== $dir $mode: ns/page over $RUNS runs: median $med, mean $mean, each: $(awk '{printf "%s ", $2}' "$runs")"
        echo "   (perf: ns per page = samples x $((1000000000 / FREQ)) ns / $pages pages; the profile sums all runs: compare with the mean)"
        report "$data" "$mean" $pages
    done
    rm -f "$file"
done
