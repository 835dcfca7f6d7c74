// Train LoRA tab: what gradio cannot do. Every global is prefixed loraTrainer.

// Click the WebUI's own extra-networks refresh buttons (txt2img / img2img Lora pages) so a new
// LoRA card appears without a click; the server side list is already refreshed by the tab.
function loraTrainerRefreshNetworks() {
    var buttons = document.querySelectorAll('[id$="_extra_refresh"], [id$="_extra_refresh_internal"]');
    buttons.forEach(function (button) {
        if (/^(txt2img|img2img)_(lora_)?extra_refresh/.test(button.id)) button.click();
    });
    return [];
}
