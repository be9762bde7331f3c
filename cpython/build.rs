//! Exposes the target interpreter's build flags (`Py_GIL_DISABLED`, `Py_3_13`, ...)
//! as cfgs, so the glue can tell free-threaded builds apart at compile time.
fn main() {
    pyo3_build_config::use_pyo3_cfgs();
}
