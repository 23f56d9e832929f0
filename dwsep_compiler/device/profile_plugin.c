/*
 * QEMU TCG plugin (user mode, QEMU 7.2 plugin API version 1): what an emulated aarch64 process
 * executes, per translated block.
 *
 * For every block: its guest address, its instruction count, how often it ran, and, with
 * mem=on, its memory accesses (loads, stores, bytes) and the L1/L2 misses of a cache model:
 * 64-byte lines, L1 64 KB 4-way, L2 512 KB 8-way, both LRU, write-allocate, L2 inclusive of
 * what L1 misses (no prefetcher, no timing). The blocks are written to out=PATH at exit, one
 * per line: vaddr insns execs loads stores load_bytes store_bytes l1_misses l2_misses.
 * dwsep_compiler/device/profile.py compiles this file with the machine's gcc, maps addresses to
 * libraries and symbols, and differences two runs into per-inference figures.
 *
 * The few plugin API functions used are declared here (QEMU's own header is not needed).
 * One vCPU is assumed (TVM_NUM_THREADS=1); other guest threads' counts may race.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

typedef uint64_t qemu_plugin_id_t;
typedef uint32_t qemu_plugin_meminfo_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
struct qemu_info_t;

enum { CB_NO_REGS = 0 };
enum { INLINE_ADD_U64 = 0 };
enum { MEM_RW = 3 };

extern void qemu_plugin_register_vcpu_tb_trans_cb(
    qemu_plugin_id_t, void (*)(qemu_plugin_id_t, struct qemu_plugin_tb *));
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
extern uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *);
extern struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *, size_t);
extern void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *, int op, void *ptr,
                                                     uint64_t imm);
extern void qemu_plugin_register_vcpu_mem_cb(
    struct qemu_plugin_insn *, void (*)(unsigned int, qemu_plugin_meminfo_t, uint64_t, void *),
    int flags, int rw, void *userdata);
extern unsigned int qemu_plugin_mem_size_shift(qemu_plugin_meminfo_t);
extern bool qemu_plugin_mem_is_store(qemu_plugin_meminfo_t);
extern void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, void (*)(qemu_plugin_id_t, void *),
                                           void *);
extern void qemu_plugin_outs(const char *);

EXPORT int qemu_plugin_version = 1;

typedef struct Block {
    uint64_t vaddr, execs, loads, stores, load_bytes, store_bytes, l1_misses, l2_misses;
    uint32_t insns;
    struct Block *next;
} Block;

static Block *blocks;
static char *out_path;
static bool track_memory;

/* --- cache model ------------------------------------------------------------------------ */
#define LINE_SHIFT 6
typedef struct {
    unsigned sets, ways;
    uint64_t *tags;  /* sets * ways, tag = line + 1 (0: empty) */
    uint64_t *stamp; /* last use, for LRU */
    uint64_t clock;
} Cache;

static Cache l1 = {.sets = 256, .ways = 4}, l2 = {.sets = 1024, .ways = 8};

static void cache_init(Cache *c) {
    c->tags = calloc((size_t)c->sets * c->ways, sizeof(uint64_t));
    c->stamp = calloc((size_t)c->sets * c->ways, sizeof(uint64_t));
}

/* true on a hit; on a miss the line replaces the least recently used way of its set */
static bool cache_access(Cache *c, uint64_t line) {
    unsigned set = (unsigned)(line % c->sets);
    uint64_t *tags = c->tags + (size_t)set * c->ways, *stamp = c->stamp + (size_t)set * c->ways;
    unsigned victim = 0;
    c->clock++;
    for (unsigned w = 0; w < c->ways; w++) {
        if (tags[w] == line + 1) {
            stamp[w] = c->clock;
            return true;
        }
        if (stamp[w] < stamp[victim]) victim = w;
    }
    tags[victim] = line + 1;
    stamp[victim] = c->clock;
    return false;
}

static void on_memory(unsigned int vcpu, qemu_plugin_meminfo_t info, uint64_t vaddr, void *data) {
    Block *b = data;
    uint64_t size = 1ull << qemu_plugin_mem_size_shift(info);
    (void)vcpu;
    if (qemu_plugin_mem_is_store(info)) {
        b->stores++;
        b->store_bytes += size;
    } else {
        b->loads++;
        b->load_bytes += size;
    }
    for (uint64_t line = vaddr >> LINE_SHIFT; line <= (vaddr + size - 1) >> LINE_SHIFT; line++) {
        if (!cache_access(&l1, line)) {
            b->l1_misses++;
            if (!cache_access(&l2, line)) b->l2_misses++;
        }
    }
}

/* --- translation and exit ----------------------------------------------------------------- */
static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    Block *b = calloc(1, sizeof(Block));
    size_t n = qemu_plugin_tb_n_insns(tb);
    (void)id;
    b->vaddr = qemu_plugin_tb_vaddr(tb);
    b->insns = (uint32_t)n;
    b->next = blocks;
    blocks = b; /* a block translated again gets a record of its own: summed by address later */
    qemu_plugin_register_vcpu_tb_exec_inline(tb, INLINE_ADD_U64, &b->execs, 1);
    if (track_memory) {
        for (size_t i = 0; i < n; i++) {
            qemu_plugin_register_vcpu_mem_cb(qemu_plugin_tb_get_insn(tb, i), on_memory,
                                             CB_NO_REGS, MEM_RW, b);
        }
    }
}

static void write_blocks(qemu_plugin_id_t id, void *data) {
    FILE *out = fopen(out_path, "w");
    (void)id;
    (void)data;
    if (out == NULL) {
        qemu_plugin_outs("dwsep profile plugin: cannot write the output file\n");
        return;
    }
    for (Block *b = blocks; b != NULL; b = b->next) {
        if (b->execs == 0) continue;
        fprintf(out, "%llx %u %llu %llu %llu %llu %llu %llu %llu\n",
                (unsigned long long)b->vaddr, b->insns, (unsigned long long)b->execs,
                (unsigned long long)b->loads, (unsigned long long)b->stores,
                (unsigned long long)b->load_bytes, (unsigned long long)b->store_bytes,
                (unsigned long long)b->l1_misses, (unsigned long long)b->l2_misses);
    }
    fclose(out);
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const struct qemu_info_t *info, int argc,
                               char **argv) {
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) out_path = strdup(argv[i] + 4);
        else if (strcmp(argv[i], "mem=on") == 0) track_memory = true;
    }
    if (out_path == NULL) {
        qemu_plugin_outs("dwsep profile plugin: needs out=PATH\n");
        return 1;
    }
    cache_init(&l1);
    cache_init(&l2);
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, write_blocks, NULL);
    return 0;
}
