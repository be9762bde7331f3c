//! Links the launcher so that it finds its libpython without LD_LIBRARY_PATH
//! (an rpath to the interpreter's LIBDIR) and exports the allocator's C API
//! (so `interheap._native` can find it with dlsym).
fn main() {
    pyo3_build_config::use_pyo3_cfgs();
    let config = pyo3_build_config::get();
    if let Some(dir) = config.lib_dir() {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{dir}");
    }
    for symbol in [
        "interheap_allocator_install",
        "interheap_allocator_install_with",
        "interheap_allocator_installed",
        "interheap_allocator_report_json",
        "interheap_allocator_free_string",
        "interheap_allocator_set_limit",
        "interheap_allocator_get_limit",
        "interheap_allocator_set_default_limit",
        "interheap_allocator_interp_figures",
        "interheap_allocator_lower_limit",
        "interheap_allocator_checks_on",
        "interheap_allocator_check_sink",
        "interheap_allocator_figures",
    ] {
        println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol={symbol}");
    }
}
