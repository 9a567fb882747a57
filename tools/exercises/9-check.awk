# Exercise 9's judge: refits the table that tools/bench.c printed, independently of bench.c, and
# compares with its summary line: the exponents within 0.03 (the table's ms have 3 decimals, the
# summary 2), the crossover exactly (or, where two printed times tie, either answer).
function slope(xs, ys, k,    i, sx, sy, sxx, sxy) {
    for (i = 1; i <= k; i++) { sx += log(xs[i]); sy += log(ys[i]); sxx += log(xs[i])^2; sxy += log(xs[i]) * log(ys[i]) }
    return (k * sxy - sx * sy) / (k * sxx - sx * sx)
}
function abs(x) { return x < 0 ? -x : x }
$2 == "dense" && $1 ~ /^[0-9]+$/ { nd++; dn[nd] = $1; dms[nd] = $5 }
$2 == "strided" && $1 ~ /^[0-9]+$/ { ns++; sn[ns] = $1; sms[ns] = $6 }
/^bench: / && !summary { summary = $0 }
END {
    if (!summary || nd < 2 || ns < 2) { print "exercise 9: no table and summary line from bench"; exit 1 }
    split(summary, kv, /[ =]/)
    for (i = 1; i < length(kv); i++) got[kv[i]] = kv[i + 1]
    e_dense = slope(dn, dms, nd); e_sparse = slope(sn, sms, ns)
    strict = "none"; loose = "none"
    for (i = nd; i >= 1 && sms[i] < dms[i]; i--) strict = dn[i]
    for (i = nd; i >= 1 && sms[i] <= dms[i]; i--) loose = dn[i]
    bad = 0
    if (abs(got["dense_exponent"] - e_dense) > 0.03) { printf "dense_exponent: bench says %s, the table gives %.3f\n", got["dense_exponent"], e_dense; bad = 1 }
    if (abs(got["sparse_exponent"] - e_sparse) > 0.03) { printf "sparse_exponent: bench says %s, the table gives %.3f\n", got["sparse_exponent"], e_sparse; bad = 1 }
    if (got["crossover"] != strict && got["crossover"] != loose) { printf "crossover: bench says %s, the table gives %s\n", got["crossover"], strict; bad = 1 }
    if (!bad) printf "exponents %.2f (dense) and %.2f (sparse), crossover %s: bench agrees with the table\n", e_dense, e_sparse, strict
    exit bad
}
