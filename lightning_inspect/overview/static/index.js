// The "Inspect" tab: TensorBoard loads this module in the plugin's frame and calls render().
export async function render() {
  const style = document.createElement("link");
  style.rel = "stylesheet";
  style.href = "./overview.css";
  document.head.appendChild(style);
  await new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = "./overview.js";
    script.onload = resolve;
    script.onerror = () => reject(new Error("overview.js did not load"));
    document.head.appendChild(script);
  });
  const root = document.createElement("div");
  root.id = "inspect-root";
  document.body.appendChild(root);
  const overview = window.LightningInspectOverview;
  await overview.start(root, overview.httpSource("./"));
}
