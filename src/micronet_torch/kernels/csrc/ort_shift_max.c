/* micronet.ShiftMax: MicroNet's Dynamic Shift-Max (fusion and max) as one ONNX Runtime CPU operator.
 *
 *   inputs   x    float (N, C_in, H, W)
 *            coef float (N, C_out * K * J): per output channel a, coefficients in (k, j) order
 *   attrs    index ints (C_out * J): output channel a reads input channels index[a*J + j]
 *            k, j  ints (1 or 2 each)
 *   output   y    float (N, C_out, H, W),  y[n, a] = max_k sum_j coef[n, a, k, j] * x[n, index[a*J + j]]
 *
 * One read of each input map and one write of the output, instead of the gather, products and max that
 * standard ONNX operators need. The library links against nothing: ONNX Runtime passes its function table
 * (OrtApi) to RegisterCustomOps, and this file calls it by slot number. Slots are only ever appended to
 * that table, so the numbers below hold for every ONNX Runtime from API version 17 (1.17) on.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "shift_max_row.h"

#define EXPORT __attribute__((visibility("default")))

/* Opaque ONNX Runtime types. */
typedef struct OrtStatus OrtStatus;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTypeShape OrtTypeShape;
typedef struct OrtDomain OrtDomain;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef void (*OrtFn)(void);
typedef const OrtFn *OrtApiTable; /* OrtApi: a table of function pointers */

typedef struct {
    OrtApiTable (*get_api)(uint32_t version);
    const char *(*get_version_string)(void);
} OrtApiBaseTable;

enum { API_VERSION = 17, ELEMENT_FLOAT = 1, ERROR_FAIL = 1, ERROR_INVALID_ARGUMENT = 2 };

/* OrtApi slot numbers of the functions used here. */
enum {
    SLOT_CREATE_STATUS = 0,
    SLOT_CREATE_DOMAIN = 26,
    SLOT_DOMAIN_ADD = 27,
    SLOT_ADD_DOMAIN = 28,
    SLOT_TENSOR_DATA = 51,
    SLOT_DIMS_COUNT = 61,
    SLOT_DIMS = 62,
    SLOT_ELEMENT_COUNT = 64,
    SLOT_TYPE_SHAPE = 65,
    SLOT_ATTR_INT = 86,
    SLOT_GET_INPUT = 90,
    SLOT_GET_OUTPUT = 91,
    SLOT_RELEASE_TYPE_SHAPE = 99,
    SLOT_ATTR_INTS = 163,
    SLOT_PARALLEL_FOR = 274,
};

typedef OrtStatus *(*CreateStatusFn)(int code, const char *msg);
typedef OrtStatus *(*CreateDomainFn)(const char *domain, OrtDomain **out);
typedef OrtStatus *(*DomainAddFn)(OrtDomain *domain, const void *op);
typedef OrtStatus *(*AddDomainFn)(OrtSessionOptions *options, OrtDomain *domain);
typedef OrtStatus *(*TensorDataFn)(OrtValue *value, void **out);
typedef OrtStatus *(*DimsCountFn)(const OrtTypeShape *info, size_t *out);
typedef OrtStatus *(*DimsFn)(const OrtTypeShape *info, int64_t *dims, size_t n);
typedef OrtStatus *(*ElementCountFn)(const OrtTypeShape *info, size_t *out);
typedef OrtStatus *(*TypeShapeFn)(const OrtValue *value, OrtTypeShape **out);
typedef OrtStatus *(*AttrIntFn)(const OrtKernelInfo *info, const char *name, int64_t *out);
typedef OrtStatus *(*AttrIntsFn)(const OrtKernelInfo *info, const char *name, int64_t *out, size_t *size);
typedef OrtStatus *(*GetInputFn)(const OrtKernelContext *ctx, size_t index, const OrtValue **out);
typedef OrtStatus *(*GetOutputFn)(OrtKernelContext *ctx, size_t index, const int64_t *dims, size_t n, OrtValue **out);
typedef void (*ReleaseFn)(void *object);
typedef OrtStatus *(*ParallelForFn)(const OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t total,
                                    size_t batches, void *data);

#define CALL(api, slot, type) ((type)(api)[slot])
#define TRY(expr)                                                                                           \
    do {                                                                                                    \
        OrtStatus *status_ = (expr);                                                                        \
        if (status_) return status_;                                                                        \
    } while (0)

/* OrtCustomOp, members in ABI order (those this operator does not use stay NULL). */
typedef struct {
    uint32_t version;
    void *(*create_kernel)(const void *op, OrtApiTable api, const OrtKernelInfo *info);
    const char *(*get_name)(const void *op);
    const char *(*get_execution_provider)(const void *op);
    int (*get_input_type)(const void *op, size_t index);
    size_t (*get_input_count)(const void *op);
    int (*get_output_type)(const void *op, size_t index);
    size_t (*get_output_count)(const void *op);
    void (*compute)(void *kernel, OrtKernelContext *ctx);
    void (*destroy)(void *kernel);
    int (*get_input_characteristic)(const void *op, size_t index);
    int (*get_output_characteristic)(const void *op, size_t index);
    int (*get_input_memory_type)(const void *op, size_t index);
    int (*variadic_input_min_arity)(const void *op);
    int (*variadic_input_homogeneity)(const void *op);
    int (*variadic_output_min_arity)(const void *op);
    int (*variadic_output_homogeneity)(const void *op);
    OrtStatus *(*create_kernel_v2)(const void *op, OrtApiTable api, const OrtKernelInfo *info, void **kernel);
    OrtStatus *(*compute_v2)(void *kernel, OrtKernelContext *ctx);
    void *infer_output_shape;
    int (*get_start_version)(const void *op);
    int (*get_end_version)(const void *op);
} CustomOp;

/* ---- the computation ------------------------------------------------------------------------------------ */
typedef struct {
    OrtApiTable api;
    int64_t k, j, c_out, max_index;
    int64_t *index; /* c_out * j input channels */
} ShiftMaxKernel;

typedef struct {
    const ShiftMaxKernel *kernel;
    const float *x, *coef;
    float *y;
    int64_t c_in, pixels, rows, rows_per_task;
} Work;

/* Output rows (n, a) in [begin, end): one pass over each input row, one write of the output row. */
static void shift_max_rows(const Work *w, int64_t begin, int64_t end) {
    const ShiftMaxKernel *kn = w->kernel;
    const int64_t hw = w->pixels, kj = kn->k * kn->j;
    for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / kn->c_out, a = r % kn->c_out;
        const float *x0 = w->x + (n * w->c_in + kn->index[a * kn->j]) * hw;
        const float *x1 = w->x + (n * w->c_in + kn->index[a * kn->j + kn->j - 1]) * hw; /* read only when J = 2 */
        shift_max_row(w->coef + r * kj, x0, x1, w->y + r * hw, hw, kn->k, kn->j);
    }
}

static void shift_max_task(void *data, size_t task) {
    const Work *w = (const Work *)data;
    const int64_t begin = (int64_t)task * w->rows_per_task;
    const int64_t end = begin + w->rows_per_task < w->rows ? begin + w->rows_per_task : w->rows;
    shift_max_rows(w, begin, end);
}

static OrtStatus *error(OrtApiTable api, int code, const char *msg) {
    return CALL(api, SLOT_CREATE_STATUS, CreateStatusFn)(code, msg);
}

static OrtStatus *shape_of(OrtApiTable api, const OrtValue *value, int64_t *dims, size_t *rank, size_t *count) {
    OrtTypeShape *info = NULL;
    TRY(CALL(api, SLOT_TYPE_SHAPE, TypeShapeFn)(value, &info));
    OrtStatus *status = CALL(api, SLOT_DIMS_COUNT, DimsCountFn)(info, rank);
    if (!status && *rank <= 8) status = CALL(api, SLOT_DIMS, DimsFn)(info, dims, *rank);
    if (!status) status = CALL(api, SLOT_ELEMENT_COUNT, ElementCountFn)(info, count);
    CALL(api, SLOT_RELEASE_TYPE_SHAPE, ReleaseFn)(info);
    return status;
}

static OrtStatus *compute(void *state, OrtKernelContext *ctx) {
    const ShiftMaxKernel *kn = (const ShiftMaxKernel *)state;
    OrtApiTable api = kn->api;
    const OrtValue *x_value = NULL, *coef_value = NULL;
    TRY(CALL(api, SLOT_GET_INPUT, GetInputFn)(ctx, 0, &x_value));
    TRY(CALL(api, SLOT_GET_INPUT, GetInputFn)(ctx, 1, &coef_value));
    int64_t dims[8], cdims[8];
    size_t rank = 0, count = 0, crank = 0, ccount = 0;
    TRY(shape_of(api, x_value, dims, &rank, &count));
    TRY(shape_of(api, coef_value, cdims, &crank, &ccount));
    char msg[256];
    if (rank != 4) {
        snprintf(msg, sizeof msg, "micronet.ShiftMax: input x must be (N, C, H, W); got rank %zu", rank);
        return error(api, ERROR_INVALID_ARGUMENT, msg);
    }
    if (dims[1] <= kn->max_index) {
        snprintf(msg, sizeof msg, "micronet.ShiftMax: x has %lld channels but index reads channel %lld",
                 (long long)dims[1], (long long)kn->max_index);
        return error(api, ERROR_INVALID_ARGUMENT, msg);
    }
    if ((int64_t)ccount != dims[0] * kn->c_out * kn->k * kn->j) {
        snprintf(msg, sizeof msg, "micronet.ShiftMax: coef has %zu values; expected N * C_out * K * J = %lld",
                 ccount, (long long)(dims[0] * kn->c_out * kn->k * kn->j));
        return error(api, ERROR_INVALID_ARGUMENT, msg);
    }
    const int64_t out_dims[4] = {dims[0], kn->c_out, dims[2], dims[3]};
    OrtValue *y_value = NULL;
    TRY(CALL(api, SLOT_GET_OUTPUT, GetOutputFn)(ctx, 0, out_dims, 4, &y_value));
    void *x = NULL, *coef = NULL, *y = NULL;
    TRY(CALL(api, SLOT_TENSOR_DATA, TensorDataFn)((OrtValue *)x_value, &x));
    TRY(CALL(api, SLOT_TENSOR_DATA, TensorDataFn)((OrtValue *)coef_value, &coef));
    TRY(CALL(api, SLOT_TENSOR_DATA, TensorDataFn)(y_value, &y));
    Work w = {kn, (const float *)x, (const float *)coef, (float *)y, dims[1], dims[2] * dims[3], 0, 0};
    w.rows = dims[0] * kn->c_out;
    if (w.rows == 0 || w.pixels == 0) return NULL;
    /* tasks of at least 16k outputs: smaller ones cost more to hand out than to compute */
    w.rows_per_task = (16384 + w.pixels - 1) / w.pixels;
    const size_t tasks = (size_t)((w.rows + w.rows_per_task - 1) / w.rows_per_task);
    if (tasks > 1) return CALL(api, SLOT_PARALLEL_FOR, ParallelForFn)(ctx, shift_max_task, tasks, 0, &w);
    shift_max_rows(&w, 0, w.rows);
    return NULL;
}

static OrtStatus *create_kernel(const void *op, OrtApiTable api, const OrtKernelInfo *info, void **out) {
    (void)op;
    ShiftMaxKernel *kn = calloc(1, sizeof *kn);
    if (!kn) return error(api, ERROR_FAIL, "micronet.ShiftMax: out of memory");
    kn->api = api;
    size_t size = 0;
    OrtStatus *status = CALL(api, SLOT_ATTR_INT, AttrIntFn)(info, "k", &kn->k);
    if (!status) status = CALL(api, SLOT_ATTR_INT, AttrIntFn)(info, "j", &kn->j);
    if (!status) status = CALL(api, SLOT_ATTR_INTS, AttrIntsFn)(info, "index", NULL, &size);
    if (!status && (kn->k < 1 || kn->k > 2 || kn->j < 1 || kn->j > 2 || size == 0 || size % (size_t)kn->j))
        status = error(api, ERROR_INVALID_ARGUMENT,
                       "micronet.ShiftMax: needs k and j in {1, 2} and an index of C_out * j channels");
    if (!status && !(kn->index = malloc(size * sizeof *kn->index)))
        status = error(api, ERROR_FAIL, "micronet.ShiftMax: out of memory");
    if (!status) status = CALL(api, SLOT_ATTR_INTS, AttrIntsFn)(info, "index", kn->index, &size);
    if (!status) {
        kn->c_out = (int64_t)size / kn->j;
        kn->max_index = 0;
        for (size_t i = 0; i < size; ++i) {
            if (kn->index[i] < 0) {
                status = error(api, ERROR_INVALID_ARGUMENT, "micronet.ShiftMax: negative channel in index");
                break;
            }
            if (kn->index[i] > kn->max_index) kn->max_index = kn->index[i];
        }
    }
    if (status) {
        free(kn->index);
        free(kn);
        return status;
    }
    *out = kn;
    return NULL;
}

static void destroy(void *state) {
    ShiftMaxKernel *kn = (ShiftMaxKernel *)state;
    if (kn) free(kn->index);
    free(kn);
}

static const char *op_name(const void *op) { (void)op; return "ShiftMax"; }
static const char *op_provider(const void *op) { (void)op; return NULL; /* CPU */ }
static int op_type(const void *op, size_t index) { (void)op; (void)index; return ELEMENT_FLOAT; }
static size_t op_inputs(const void *op) { (void)op; return 2; }
static size_t op_outputs(const void *op) { (void)op; return 1; }
static int op_required(const void *op, size_t index) { (void)op; (void)index; return 0; }
static int op_memory(const void *op, size_t index) { (void)op; (void)index; return 0; }
static void compute_v1(void *state, OrtKernelContext *ctx) { (void)state; (void)ctx; /* V2 is used */ }

static const CustomOp shift_max_op = {
    .version = API_VERSION,
    .get_name = op_name,
    .get_execution_provider = op_provider,
    .get_input_type = op_type,
    .get_input_count = op_inputs,
    .get_output_type = op_type,
    .get_output_count = op_outputs,
    .compute = compute_v1,
    .destroy = destroy,
    .get_input_characteristic = op_required,
    .get_output_characteristic = op_required,
    .get_input_memory_type = op_memory,
    .create_kernel_v2 = create_kernel,
    .compute_v2 = compute,
};

/* Called by SessionOptions.register_custom_ops_library: adds the "micronet" domain to the session options. */
EXPORT OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBaseTable *base) {
    OrtApiTable api = base->get_api(API_VERSION);
    if (!api) {
        OrtApiTable old = base->get_api(1);
        return old ? error(old, ERROR_FAIL, "micronet ops need ONNX Runtime 1.17 or newer") : NULL;
    }
    OrtDomain *domain = NULL;
    TRY(CALL(api, SLOT_CREATE_DOMAIN, CreateDomainFn)("micronet", &domain));
    TRY(CALL(api, SLOT_DOMAIN_ADD, DomainAddFn)(domain, &shift_max_op));
    return CALL(api, SLOT_ADD_DOMAIN, AddDomainFn)(options, domain);
}
