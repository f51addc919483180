// Q4_0 matrix products through ggml's CPU backend, weights in its repack buffer: the kernels
// llama-server decodes a Q4_0 file with (`q4_0_8x8_q8_0` where the CPU has AVX2 or AVX-512).
// bench/kernels.py compiles this against the llama.cpp tree of LLAMA_SERVER and runs the same
// shapes through onnxruntime's MatMulNBits beside it.
//
// usage: q4_0_matmul LAYERS ROWS THREADS REPS K,N [K,N ...]
// Builds LAYERS copies of the weights K×N (random Q4_0 blocks), so that a pass reads them from
// memory as a decode step does, and one graph of every product on ROWS rows of activations.
// Prints the median seconds of a pass over REPS passes, after one warm-up pass.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

#define MAX_SHAPES 16
#define Q4_0_BLOCK_BYTES 18 /* a float16 scale, then 32 codes of 4 bits */

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

// The CPU device's repack buffer type; without one (no AVX2), the plain CPU buffer.
static ggml_backend_buffer_type_t weight_buffer_type(void) {
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    ggml_backend_dev_get_extra_bufts_t extra_types = (ggml_backend_dev_get_extra_bufts_t)
        ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(cpu), "ggml_backend_dev_get_extra_bufts");
    for (ggml_backend_buffer_type_t *type = extra_types ? extra_types(cpu) : NULL; type && *type; type++) {
        if (strstr(ggml_backend_buft_name(*type), "REPACK")) return *type;
    }
    return ggml_backend_cpu_buffer_type();
}

static void fill_random_q4_0(struct ggml_tensor *weight) {
    size_t bytes = ggml_nbytes(weight);
    unsigned char *data = malloc(bytes);
    for (size_t block = 0; block < bytes; block += Q4_0_BLOCK_BYTES) {
        ggml_fp16_t scale = ggml_fp32_to_fp16(0.001f + (float)(rand() % 100) * 1e-5f);
        memcpy(data + block, &scale, sizeof scale);
        for (size_t i = sizeof scale; i < Q4_0_BLOCK_BYTES; i++) data[block + i] = (unsigned char)(rand() & 0xFF);
    }
    ggml_backend_tensor_set(weight, data, 0, bytes);  // the repack buffer reorders the blocks here
    free(data);
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s LAYERS ROWS THREADS REPS K,N [K,N ...]\n", argv[0]);
        return 2;
    }
    int layers = atoi(argv[1]), rows = atoi(argv[2]), threads = atoi(argv[3]), reps = atoi(argv[4]);
    int shapes = argc - 5, k[MAX_SHAPES], n[MAX_SHAPES];
    if (shapes > MAX_SHAPES || layers < 1 || rows < 1 || threads < 1 || reps < 1) return 2;
    for (int s = 0; s < shapes; s++) {
        if (sscanf(argv[5 + s], "%d,%d", &k[s], &n[s]) != 2) return 2;
    }
    ggml_backend_t backend = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(backend, threads);

    struct ggml_init_params weight_params = {ggml_tensor_overhead() * (size_t)(layers * shapes), NULL, true};
    struct ggml_context *weight_context = ggml_init(weight_params);
    struct ggml_tensor **weights = malloc(sizeof *weights * (size_t)(layers * shapes));
    for (int i = 0; i < layers * shapes; i++) {
        weights[i] = ggml_new_tensor_2d(weight_context, GGML_TYPE_Q4_0, k[i % shapes], n[i % shapes]);
    }
    ggml_backend_buffer_type_t buffer_type = weight_buffer_type();
    ggml_backend_buffer_t weight_buffer = ggml_backend_alloc_ctx_tensors_from_buft(weight_context, buffer_type);
    srand(1);
    for (int i = 0; i < layers * shapes; i++) fill_random_q4_0(weights[i]);

    size_t nodes = (size_t)(layers * shapes + shapes);
    struct ggml_init_params graph_params = {ggml_tensor_overhead() * nodes + ggml_graph_overhead(), NULL, true};
    struct ggml_context *graph_context = ggml_init(graph_params);
    struct ggml_tensor *inputs[MAX_SHAPES];
    struct ggml_cgraph *graph = ggml_new_graph(graph_context);
    for (int s = 0; s < shapes; s++) inputs[s] = ggml_new_tensor_2d(graph_context, GGML_TYPE_F32, k[s], rows);
    for (int i = 0; i < layers * shapes; i++) {
        ggml_build_forward_expand(graph, ggml_mul_mat(graph_context, weights[i], inputs[i % shapes]));
    }
    ggml_backend_buffer_t graph_buffer =
        ggml_backend_alloc_ctx_tensors_from_buft(graph_context, ggml_backend_cpu_buffer_type());
    for (int s = 0; s < shapes; s++) {
        size_t count = (size_t)k[s] * (size_t)rows;
        float *values = malloc(count * sizeof *values);
        for (size_t i = 0; i < count; i++) values[i] = (float)(rand() % 2000 - 1000) * 1e-3f;
        ggml_backend_tensor_set(inputs[s], values, 0, count * sizeof *values);
        free(values);
    }

    ggml_backend_graph_compute(backend, graph);  // warm-up
    double *times = malloc(sizeof *times * (size_t)reps);
    for (int r = 0; r < reps; r++) {
        double start = seconds_now();
        ggml_backend_graph_compute(backend, graph);
        times[r] = seconds_now() - start;
    }
    qsort(times, (size_t)reps, sizeof *times, by_value);
    printf("%s %.6f\n", ggml_backend_buft_name(buffer_type), times[reps / 2]);

    free(times);
    ggml_backend_buffer_free(graph_buffer);
    ggml_backend_buffer_free(weight_buffer);
    ggml_free(graph_context);
    ggml_free(weight_context);
    free(weights);
    ggml_backend_free(backend);
    return 0;
}
