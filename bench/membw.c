// Read bandwidth of main memory: the bound on decode speed, which reads every weight once per
// token. Sums a 2 GiB array with OpenMP; prints the best of 10 passes in GB/s.
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    const size_t n = (size_t)1 << 29; // 2 GiB of floats
    float *a = malloc(n * sizeof(float));
    if (!a) return 1;
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 7);
    double best = 0, sink = 0;
    for (int pass = 0; pass < 10; pass++) {
        double t0 = omp_get_wtime();
        float sum = 0; // float lanes so the loop vectorises and memory, not adds, is the bound
#pragma omp parallel for simd reduction(+ : sum)
        for (size_t i = 0; i < n; i++) sum += a[i];
        double gbs = n * sizeof(float) / (omp_get_wtime() - t0) / 1e9;
        if (gbs > best) best = gbs;
        sink += sum;
    }
    printf("read bandwidth: %.1f GB/s (%d threads, checksum %.0f)\n", best, omp_get_max_threads(), sink);
    free(a);
    return 0;
}
