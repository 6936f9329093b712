// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
// The kernel only lets GPL-compatible programs call bpf_probe_read_kernel (used by
// BPF_CORE_READ), hence "Dual MIT/GPL" below.
//
// signal.bpf.c: report every POSIX signal the kernel delivers to a process.
//
// Attached to the BTF tracepoint `signal_generate` (include/trace/events/signal.h),
// which fires in __send_signal_locked() for every kill(2), tgkill(2), rt_sigqueueinfo(2),
// fault (SIGSEGV, SIGBUS...), timer and kernel-generated signal. Only result == 0
// (TRACE_SIGNAL_DELIVERED: the signal was queued on the target) is reported;
// IGNORED, ALREADY_PENDING (a standard signal that merges with a pending one),
// OVERFLOW_FAIL and LOSE_INFO are skipped.
//
// CO-RE: vmlinux.h is generated at build time from /sys/kernel/btf/vmlinux.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#define TRACE_SIGNAL_DELIVERED 0

// Layout shared with userspace (crates/auraed/src/host/ebpf/aya.rs): 16 bytes.
struct signal_event {
	__u32 sig;       // signal number
	__u32 tgid;      // host tgid (process id) of the target task
	__u64 cgroup_id; // kernfs id of the target's cgroup in the default (cgroup2) hierarchy
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 * 1024 * 1024);
} EVENTS SEC(".maps");

// Events lost because the ring buffer was full; one slot, summed over CPUs by userspace.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} DROPS SEC(".maps");

SEC("tp_btf/signal_generate")
int BPF_PROG(signal_generate, int sig, struct kernel_siginfo *info, struct task_struct *task,
	     int group, int result)
{
	if (result != TRACE_SIGNAL_DELIVERED)
		return 0;

	struct signal_event *ev = bpf_ringbuf_reserve(&EVENTS, sizeof(*ev), 0);
	if (!ev) {
		__u32 key = 0;
		__u64 *drops = bpf_map_lookup_elem(&DROPS, &key);
		if (drops)
			*drops += 1; // per-CPU slot: no concurrent writers
		return 0;
	}

	ev->sig = sig;
	ev->tgid = BPF_CORE_READ(task, tgid);
	ev->cgroup_id = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
